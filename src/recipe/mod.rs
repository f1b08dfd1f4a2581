//! Batch recipes (`lorastream run RECIPE.toml`): a TOML list of `merge`/`convert` jobs
//! with shared defaults and `${var}` substitution, run one after another or N at a time,
//! each as a child process of the same executable, with a resume record beside each
//! output so a re-run skips the jobs that are already complete.
//!
//! - [`parse`] turns the TOML into jobs: every key is the long name of one of the
//!   command's own options (or positional arguments), so a job takes exactly what the
//!   command line takes, and the argument list is checked by the CLI's own parser before
//!   anything runs. Options added to `merge`/`convert` later work in recipes unchanged.
//! - [`record`] owns the resume record: which inputs (paths, sizes, modification times)
//!   and which options produced an output, written only once the job has succeeded.
//! - [`runner`] schedules the jobs, runs the children, forwards stop signals to them and
//!   reports one line per finished job and a summary.

pub mod parse;
pub mod record;
pub mod runner;

pub use parse::{Job, Recipe, load};
pub use runner::{RunOptions, Summary, run};
