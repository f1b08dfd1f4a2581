//! Reading a recipe: TOML → jobs, each job an argument list for `merge` or `convert`.
//!
//! ```toml
//! [vars]                    # ${name} anywhere in a value; --var NAME=VALUE overrides
//! models = "/data/models"
//!
//! [defaults]                # every job (keys every job's command takes)
//! dtype = "bf16"
//! [defaults.merge]          # merge jobs only (likewise [defaults.convert])
//! shard_size = "2GB"
//!
//! [[job]]
//! name = "llama-a"          # optional; default: the job's output
//! command = "merge"
//! base = "${models}/llama"
//! lora = ["a/", "b/"]       # a repeatable option takes a list
//! out = "out/llama-a/"
//!
//! [[job]]                   # one job per value of `each` (a list, or { glob = "dir/*.bin" })
//! command = "convert"
//! each.ckpt = { glob = "ckpts/*.bin" }
//! input = "${ckpt}"
//! output = "st/${ckpt.stem}.safetensors"
//! ```
//!
//! Keys are the commands' own long option names (`shard_size` or `shard-size` for
//! `--shard-size`) and positional argument names (`input`, `output`), found through the
//! CLI's definition rather than a list of ours, so every option the command line has
//! works here, today's and later ones'. A flag takes `true`/`false`, a repeatable option
//! a list. The argument list built from a job is parsed by the CLI's own parser before
//! anything runs: an unknown key, a bad value or a missing required option is a usage
//! error naming the job. Relative paths are relative to the recipe's folder (jobs run
//! there), so a recipe and its inputs move together.
//!
//! Variables: `[vars]` in order (a value may use the vars above it), `--var` values
//! (literal), `${recipe_dir}`, an `each` variable, and the environment only when asked
//! for by name, `${env.HOME}`: a misspelt variable is then an error instead of a silently
//! empty string. `${x.stem}`, `${x.name}` and `${x.parent}` take that part of x's value
//! as a path. `$$` is a literal `$` (write `$${1}` for a regex replacement group); a `$`
//! not followed by `{` stays as it is (`$1`).

use crate::error::{Error, Result};
use crate::natural::natural_cmp;
use clap::ArgAction;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use toml::{Table, Value};

/// The commands a job may run.
pub const COMMANDS: [&str; 2] = ["merge", "convert"];
/// Keys of a `[[job]]` table that are the recipe's own, not the command's options.
const JOB_KEYS: [&str; 3] = ["name", "command", "each"];
/// Argument ids (fields of the CLI's `merge`/`convert`) whose values name the output.
const OUTPUT_IDS: [&str; 3] = ["out", "out_path", "output"];
/// Argument ids whose values name input files or folders (their identity decides
/// whether a finished job is still complete). Other options are compared as text only.
const INPUT_IDS: [&str; 4] = ["input", "bases", "loras", "expect_keys_from"];

/// One job: the command and its argument list, and what the runner needs to know about
/// it (output, inputs, order).
#[derive(Clone, Debug)]
pub struct Job {
    /// Position in the expanded list (0-based).
    pub index: usize,
    pub name: String,
    pub command: String,
    /// Options as `--long=value` (or `--flag`), in the recipe's order, defaults first.
    pub options: Vec<String>,
    /// Positional arguments in the command's order, given after `--`.
    pub positionals: Vec<String>,
    /// The output as the job names it (relative to the recipe's folder, or absolute).
    pub output: Option<String>,
    /// The output's absolute path, lexically normalised, without a trailing '/'.
    pub output_path: Option<PathBuf>,
    /// Input files and folders, absolute (those the options in `INPUT_IDS` name).
    pub inputs: Vec<PathBuf>,
    /// Earlier jobs whose output is one of this job's inputs: this one waits for them.
    pub after: Vec<usize>,
    /// Another job of the recipe writes the same output (parts of one partitioned output).
    pub shared_output: bool,
}

impl Job {
    /// The argument list after the command name, with `extra` options (the runner's own,
    /// `--json`) before the positionals.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = self.options.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        if !self.positionals.is_empty() {
            a.push("--".into());
            a.extend(self.positionals.iter().cloned());
        }
        a
    }

    /// Whether the output is a folder (named with a trailing '/', or one already).
    pub fn folder_output(&self) -> bool {
        self.output.as_deref().is_some_and(|o| o.ends_with('/'))
            || self.output_path.as_deref().is_some_and(Path::is_dir)
    }

    /// Whether the job's options hold `flag` (`--overwrite`), as the user gave it.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.options.iter().any(|o| o == flag)
    }

    /// The command line, for people (`--dry-run`, failures).
    pub fn command_line(&self) -> String {
        let mut words = vec!["lorastream".to_string(), self.command.clone()];
        words.extend(self.args(&[]).iter().map(|a| shell_quote(a)));
        words.join(" ")
    }
}

/// A parsed recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// The recipe file as given.
    pub path: PathBuf,
    /// Its folder, absolute: jobs run there.
    pub dir: PathBuf,
    pub jobs: Vec<Job>,
}

/// Reads recipe `path`, with `overrides` (`--var NAME=VALUE`), checking every job's
/// argument list with `cli` (the program's command definition). Every problem is an
/// [`Error::Usage`] naming the recipe, the job and the key.
pub fn load(path: &Path, overrides: &[String], cli: &clap::Command) -> Result<Recipe> {
    let shown = path.display().to_string();
    let usage = |msg: String| Error::Usage(format!("{shown}: {msg}"));
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => usage("no such recipe file".into()),
        _ => usage(format!("cannot read: {e}")),
    })?;
    let doc: Table = text
        .parse()
        .map_err(|e: toml::de::Error| usage(format!("not valid TOML: {}", e.message())))?;
    let dir = absolute(path.parent().unwrap_or(Path::new("")));
    for key in doc.keys() {
        if !["vars", "defaults", "job"].contains(&key.as_str()) {
            return Err(usage(format!(
                "unknown top-level key '{key}' (a recipe has [vars], [defaults] and [[job]] tables)"
            )));
        }
    }
    let mut vars = Vars::new(&dir);
    for spec in overrides {
        let (k, v) = spec
            .split_once('=')
            .filter(|(k, _)| valid_var_name(k))
            .ok_or_else(|| usage(format!("--var '{spec}': expected NAME=VALUE")))?;
        vars.overridden.push((k.to_string(), v.to_string()));
    }
    if let Some(v) = doc.get("vars") {
        let table = v
            .as_table()
            .ok_or_else(|| usage("[vars] must be a table of NAME = \"value\"".into()))?;
        for (k, v) in table {
            if !valid_var_name(k) || k == "env" || k == "recipe_dir" {
                return Err(usage(format!(
                    "[vars]: '{k}' cannot be a variable name (letters, digits, '_', '-'; not \
                     env or recipe_dir)"
                )));
            }
            let raw = scalar(v)
                .ok_or_else(|| usage(format!("[vars]: '{k}' must be a string or a number")))?;
            let value = vars
                .expand(&raw)
                .map_err(|m| usage(format!("[vars] {k}: {m}")))?;
            vars.defined.push((k.clone(), value));
        }
    }
    let (common, per_command) = defaults(&doc).map_err(usage)?;
    let jobs = match doc.get("job") {
        None => return Err(usage("no jobs: add [[job]] tables".into())),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(usage("no jobs: add [[job]] tables".into()));
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(usage("'job' must be an array of tables: [[job]]".into())),
    };
    let mut out: Vec<Job> = Vec::new();
    for (n, entry) in jobs.iter().enumerate() {
        let at = format!("[[job]] #{}", n + 1);
        let table = entry
            .as_table()
            .ok_or_else(|| usage(format!("{at} is not a table")))?;
        let label = match table.get("name").and_then(Value::as_str) {
            Some(name) => format!("{at} ('{name}')"),
            None => at.clone(),
        };
        let command = match table.get("command") {
            Some(Value::String(c)) if COMMANDS.contains(&c.as_str()) => c.clone(),
            Some(c) => {
                return Err(usage(format!(
                    "{label}: command {c} is not one of {}",
                    COMMANDS.join(", ")
                )));
            }
            None => {
                return Err(usage(format!(
                    "{label}: no command (command = \"merge\" or \"convert\")"
                )));
            }
        };
        let sub = cli
            .find_subcommand(&command)
            .ok_or_else(|| Error::Internal(format!("the CLI has no '{command}' command")))?;
        let each = each_values(table.get("each"), &vars, &dir)
            .map_err(|m| usage(format!("{label}: {m}")))?;
        for binding in each {
            let mut scope = vars.clone();
            if let Some((k, v)) = &binding {
                scope.defined.push((k.clone(), v.clone()));
            }
            let mut entries: Vec<(String, &Value, &str)> = Vec::new();
            let mut put = |key: &str, v: &'static str, value| {
                let norm = key.replace('-', "_");
                match entries.iter_mut().find(|(k, _, _)| *k == norm) {
                    Some(e) => *e = (norm, value, v),
                    None => entries.push((norm, value, v)),
                }
            };
            for (k, v) in &common {
                put(k, "[defaults]", *v);
            }
            if let Some(t) = per_command.iter().find(|(c, _)| *c == command) {
                for (k, v) in &t.1 {
                    put(k, "the command's defaults", *v);
                }
            }
            for (k, v) in table
                .iter()
                .filter(|(k, _)| !JOB_KEYS.contains(&k.as_str()))
            {
                put(k, "the job", v);
            }
            let mut job = build(&command, sub, &entries, &scope).map_err(|m| {
                let in_which = binding
                    .as_ref()
                    .map(|(k, v)| format!(" ({k} = {v})"))
                    .unwrap_or_default();
                usage(format!("{label}{in_which}: {m}"))
            })?;
            let given_name = match table.get("name") {
                Some(Value::String(s)) => Some(
                    scope
                        .expand(s)
                        .map_err(|m| usage(format!("{label}: name: {m}")))?,
                ),
                Some(_) => return Err(usage(format!("{label}: name must be a string"))),
                None => None,
            };
            let name = given_name.clone().unwrap_or_else(|| label.clone());
            let argv = [OsString::from("lorastream"), OsString::from(&command)]
                .into_iter()
                .chain(job.args(&[]).into_iter().map(OsString::from));
            let matches = cli
                .clone()
                .try_get_matches_from(argv)
                .map_err(|e| usage(format!("{label} ({command}): {}", clap_message(&e))))?;
            let m = matches
                .subcommand_matches(&command)
                .ok_or_else(|| Error::Internal("recipe: subcommand not parsed".into()))?;
            job.index = out.len();
            job.output = OUTPUT_IDS.iter().flat_map(|id| raw(m, id)).next();
            // Unnamed jobs are called by their output: unique in most recipes, and stable
            // when jobs are added or reordered.
            job.name = given_name.or_else(|| job.output.clone()).unwrap_or(name);
            job.output_path = job
                .output
                .as_deref()
                .map(|o| lexical(&dir.join(o.trim_end_matches('/'))));
            job.inputs = INPUT_IDS
                .iter()
                .flat_map(|id| raw(m, id))
                .map(|spec| lexical(&dir.join(input_path(&spec, &dir))))
                .collect();
            out.push(job);
        }
    }
    for (i, j) in out.iter().enumerate() {
        if let Some(k) = out[..i].iter().position(|o| o.name == j.name) {
            return Err(usage(format!(
                "jobs {} and {} are both named '{}'; give them distinct names",
                k + 1,
                i + 1,
                j.name
            )));
        }
    }
    let outputs: Vec<Option<PathBuf>> = out.iter().map(|j| j.output_path.clone()).collect();
    for (i, job) in out.iter_mut().enumerate() {
        job.shared_output = job.output_path.is_some()
            && outputs
                .iter()
                .enumerate()
                .any(|(k, o)| k != i && *o == job.output_path);
        job.after = outputs[..i]
            .iter()
            .enumerate()
            .filter(|(_, o)| {
                o.as_ref()
                    .is_some_and(|o| job.inputs.iter().any(|p| p.starts_with(o)))
            })
            .map(|(k, _)| k)
            .collect();
    }
    Ok(Recipe {
        path: path.to_path_buf(),
        dir,
        jobs: out,
    })
}

/// `[defaults]`: the keys for every job, and `[defaults.merge]`/`[defaults.convert]`.
#[allow(clippy::type_complexity)]
fn defaults(
    doc: &Table,
) -> Result<(Vec<(&str, &Value)>, Vec<(&str, Vec<(&str, &Value)>)>), String> {
    let mut common = Vec::new();
    let mut per = Vec::new();
    let Some(d) = doc.get("defaults") else {
        return Ok((common, per));
    };
    let t = d
        .as_table()
        .ok_or_else(|| "[defaults] must be a table".to_string())?;
    for (k, v) in t {
        match v {
            Value::Table(sub) if COMMANDS.contains(&k.as_str()) => {
                per.push((
                    k.as_str(),
                    sub.iter().map(|(a, b)| (a.as_str(), b)).collect(),
                ));
            }
            Value::Table(_) => {
                return Err(format!(
                    "[defaults.{k}]: not a command (sub-tables of [defaults] are {})",
                    COMMANDS.join(", ")
                ));
            }
            _ => common.push((k.as_str(), v)),
        }
    }
    Ok((common, per))
}

/// The argument list of one job from its keys (defaults included), with variables
/// substituted. Errors are messages for the caller to prefix with the job.
fn build(
    command: &str,
    sub: &clap::Command,
    entries: &[(String, &Value, &str)],
    vars: &Vars,
) -> std::result::Result<Job, String> {
    let mut options = Vec::new();
    let mut positionals: Vec<(usize, String)> = Vec::new();
    for (key, value, from) in entries {
        if key == "json" {
            return Err(format!(
                "key 'json' (in {from}): the runner reads each job's --json report itself; \
                 use `run --json` for JSON lines"
            ));
        }
        let arg = find_arg(sub, key).ok_or_else(|| {
            format!(
                "unknown key '{key}' (in {from}); {command} takes: {}",
                keys_of(sub).join(", ")
            )
        })?;
        let text = |v: &Value| -> std::result::Result<String, String> {
            let s = scalar(v).ok_or_else(|| {
                format!("key '{key}' (in {from}): expected a string or a number, got {v}")
            })?;
            vars.expand(&s).map_err(|m| format!("key '{key}': {m}"))
        };
        if arg.is_positional() {
            positionals.push((arg.get_index().unwrap_or(usize::MAX), text(value)?));
            continue;
        }
        let long = arg.get_long().unwrap_or(key.as_str()).to_string();
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count => match value {
                Value::Boolean(true) => options.push(format!("--{long}")),
                Value::Boolean(false) => {}
                _ => return Err(format!("key '{key}' (in {from}) is a flag: true or false")),
            },
            ArgAction::Append => match value {
                Value::Array(items) => {
                    for v in items {
                        options.push(format!("--{long}={}", text(v)?));
                    }
                }
                v => options.push(format!("--{long}={}", text(v)?)),
            },
            ArgAction::Set => {
                if value.is_array() {
                    return Err(format!(
                        "key '{key}' (in {from}) takes one value, not a list"
                    ));
                }
                options.push(format!("--{long}={}", text(value)?));
            }
            _ => return Err(format!("key '{key}' (in {from}) cannot be set in a recipe")),
        }
    }
    positionals.sort_by_key(|(i, _)| *i);
    Ok(Job {
        index: 0,
        name: String::new(),
        command: command.to_string(),
        options,
        positionals: positionals.into_iter().map(|(_, v)| v).collect(),
        output: None,
        output_path: None,
        inputs: Vec::new(),
        after: Vec::new(),
        shared_output: false,
    })
}

/// The argument of `sub` that recipe key `key` sets: a long option name, or a
/// positional argument's name, with '_' and '-' alike.
fn find_arg<'a>(sub: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    let dashed = key.replace('_', "-");
    sub.get_arguments().find(|a| {
        let id = a.get_id().as_str();
        if id == "help" || id == "version" {
            return false;
        }
        if a.is_positional() {
            id.replace('_', "-") == dashed
        } else {
            a.get_long() == Some(dashed.as_str())
        }
    })
}

/// Every key `sub` takes, for the unknown-key message.
fn keys_of(sub: &clap::Command) -> Vec<String> {
    sub.get_arguments()
        .filter(|a| !["help", "version", "json"].contains(&a.get_id().as_str()))
        .filter_map(|a| {
            if a.is_positional() {
                Some(a.get_id().as_str().to_string())
            } else {
                a.get_long().map(|l| l.replace('-', "_"))
            }
        })
        .collect()
}

/// The values argument `id` was given, as text (none when `id` is not an argument of
/// this command).
fn raw(m: &clap::ArgMatches, id: &str) -> Vec<String> {
    m.try_get_raw(id)
        .ok()
        .flatten()
        .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// clap's error as one line, without its "error: " and usage lines.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .trim()
        .to_string()
}

/// The path an input option's value names: `--base NAME=PATH`, `--lora NAME=DIR:WEIGHT`,
/// read as the CLI reads them (a value that is an existing path as a whole is that path).
fn input_path(spec: &str, dir: &Path) -> String {
    let exists = |s: &str| dir.join(s).exists();
    let after_name = match spec.split_once('=') {
        Some((name, rest))
            if !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
        {
            rest
        }
        _ => spec,
    };
    let no_weight = |s: &str| -> String {
        match s.rsplit_once(':') {
            Some((head, w)) if !head.is_empty() && w.parse::<f64>().is_ok() => head.to_string(),
            _ => s.to_string(),
        }
    };
    let candidates = [
        spec.to_string(),
        after_name.to_string(),
        no_weight(spec),
        no_weight(after_name),
    ];
    candidates
        .iter()
        .find(|c| exists(c))
        .cloned()
        .unwrap_or_else(|| no_weight(after_name))
}

/// One value of `each`: a list of values, or `{ glob = "dir/*.bin" }`.
fn each_values(
    each: Option<&Value>,
    vars: &Vars,
    dir: &Path,
) -> std::result::Result<Vec<Option<(String, String)>>, String> {
    let Some(each) = each else {
        return Ok(vec![None]);
    };
    let t = each
        .as_table()
        .filter(|t| t.len() == 1)
        .ok_or("each takes one variable: each.NAME = [values] or { glob = \"dir/*.ext\" }")?;
    let (var, spec) = t.iter().next().ok_or("each is empty")?;
    if !valid_var_name(var) {
        return Err(format!("each.{var}: not a variable name"));
    }
    let values: Vec<String> = match spec {
        Value::Array(items) => items
            .iter()
            .map(|v| {
                scalar(v)
                    .ok_or_else(|| format!("each.{var}: values must be strings or numbers"))
                    .and_then(|s| vars.expand(&s).map_err(|m| format!("each.{var}: {m}")))
            })
            .collect::<std::result::Result<_, _>>()?,
        Value::Table(g) if g.len() == 1 && g.get("glob").is_some_and(Value::is_str) => {
            let pattern = g.get("glob").and_then(Value::as_str).unwrap_or_default();
            let pattern = vars
                .expand(pattern)
                .map_err(|m| format!("each.{var}.glob: {m}"))?;
            glob(&pattern, dir).map_err(|m| format!("each.{var}.glob '{pattern}': {m}"))?
        }
        _ => {
            return Err(format!(
                "each.{var}: a list of values or {{ glob = \"dir/*.ext\" }}"
            ));
        }
    };
    if values.is_empty() {
        return Err(format!(
            "each.{var} has no values, so the job would not run at all"
        ));
    }
    Ok(values.into_iter().map(|v| Some((var.clone(), v))).collect())
}

/// The entries of one folder whose names match a pattern with `*` and `?` in its last
/// component (`ckpts/*.bin`), in natural order, written as the pattern writes the folder.
/// Hidden entries only when the pattern starts with '.'.
fn glob(pattern: &str, dir: &Path) -> std::result::Result<Vec<String>, String> {
    let (folder, name_pattern) = match pattern.rsplit_once('/') {
        Some((f, n)) => (Some(if f.is_empty() { "/" } else { f }), n),
        None => (None, pattern),
    };
    if folder.is_some_and(|f| f.contains(['*', '?'])) {
        return Err("wildcards go in the last part of the path only".into());
    }
    let listed = dir.join(folder.unwrap_or("."));
    let rd = std::fs::read_dir(&listed).map_err(|e| format!("{}: {e}", listed.display()))?;
    let mut names: Vec<String> = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", listed.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with('.') && !name_pattern.starts_with('.'))
            || !wildcard(name_pattern, &name)
        {
            continue;
        }
        names.push(name);
    }
    names.sort_by(|a, b| natural_cmp(a, b));
    if names.is_empty() {
        return Err(format!("matches nothing in {}", listed.display()));
    }
    Ok(names
        .into_iter()
        .map(|n| match folder {
            Some("/") => format!("/{n}"),
            Some(f) => format!("{f}/{n}"),
            None => n,
        })
        .collect())
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character).
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point for the last '*': linear enough for
    // file names, and no recursion to blow up on long patterns.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// A TOML value as one argument's text: strings as they are, numbers printed.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

fn valid_var_name(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The variables in scope.
#[derive(Clone, Debug)]
struct Vars {
    /// `--var` values: win over `[vars]`.
    overridden: Vec<(String, String)>,
    /// `[vars]`, `each`, in definition order.
    defined: Vec<(String, String)>,
    recipe_dir: String,
}

impl Vars {
    fn new(dir: &Path) -> Vars {
        Vars {
            overridden: Vec::new(),
            defined: Vec::new(),
            recipe_dir: dir.display().to_string(),
        }
    }

    fn lookup(&self, name: &str) -> Option<String> {
        if let Some(var) = name.strip_prefix("env.") {
            return std::env::var(var).ok();
        }
        if name == "recipe_dir" {
            return Some(self.recipe_dir.clone());
        }
        let plain = |n: &str| {
            self.overridden
                .iter()
                .chain(self.defined.iter().rev())
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = plain(name) {
            return Some(v);
        }
        let (base, part) = name.rsplit_once('.')?;
        let v = plain(base).or_else(|| (base == "recipe_dir").then(|| self.recipe_dir.clone()))?;
        let p = Path::new(v.trim_end_matches('/'));
        let s = |o: Option<&std::ffi::OsStr>| o.map(|x| x.to_string_lossy().into_owned());
        match part {
            "stem" => s(p.file_stem()),
            "name" => s(p.file_name()),
            "parent" => p.parent().map(|x| x.display().to_string()),
            _ => None,
        }
    }

    /// `s` with every `${name}` replaced; `$$` is `$`.
    fn expand(&self, s: &str) -> std::result::Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at + 1..];
            if let Some(t) = tail.strip_prefix('$') {
                out.push('$');
                rest = t;
            } else if let Some(t) = tail.strip_prefix('{') {
                let end = t
                    .find('}')
                    .ok_or_else(|| format!("'${{' without a closing '}}' in \"{s}\""))?;
                let name = &t[..end];
                let value = self.lookup(name).ok_or_else(|| {
                    if let Some(var) = name.strip_prefix("env.") {
                        format!("unknown variable '{name}': the environment has no {var}")
                    } else {
                        format!(
                            "unknown variable '{name}' (define it in [vars] or pass --var \
                             {name}=VALUE; a literal '${{' is written '$${{')"
                        )
                    }
                })?;
                out.push_str(&value);
                rest = &t[end + 1..];
            } else {
                out.push('$');
                rest = tail;
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `p` made absolute against the current folder.
fn absolute(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    std::path::absolute(p)
        .map(|a| lexical(&a))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// `p` without `.` and `a/..` components (by text: the paths may not exist yet).
pub fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` quoted for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::new(Path::new("/r"));
        v.defined
            .push(("m".into(), "/data/ckpt/model-7.bin".into()));
        v
    }

    #[test]
    fn variables_expand_and_unknown_ones_are_named() {
        let v = vars();
        assert_eq!(v.expand("${m.stem}.st").unwrap(), "model-7.st");
        assert_eq!(
            v.expand("${m.name}|${m.parent}").unwrap(),
            "model-7.bin|/data/ckpt"
        );
        assert_eq!(v.expand("${recipe_dir}/x").unwrap(), "/r/x");
        // Regex replacement syntax: `$1` stays, `$${1}` is the literal `${1}`.
        assert_eq!(v.expand("a$1 $${1} $$").unwrap(), "a$1 ${1} $");
        let e = v.expand("${nope}/x").unwrap_err();
        assert!(e.contains("'nope'") && e.contains("--var nope="), "{e}");
        assert!(v.expand("${m").unwrap_err().contains("closing"));
        assert!(v.expand("${env.LORASTREAM_SURELY_UNSET_VAR}").is_err());
    }

    /// A command line with an option this module has never heard of (`--part`): recipes
    /// take it by its long name, and jobs sharing one output get records of their own.
    #[test]
    fn options_come_from_the_command_definition() {
        use clap::{Arg, ArgAction, Command};
        let merge = Command::new("merge")
            .arg(Arg::new("out").long("out").required(true))
            .arg(Arg::new("loras").long("lora").action(ArgAction::Append))
            .arg(Arg::new("part").long("part"))
            .arg(
                Arg::new("keep_lora")
                    .long("keep-lora")
                    .action(ArgAction::SetTrue),
            );
        let cli = Command::new("lorastream")
            .subcommand(merge)
            .subcommand(Command::new("convert").arg(Arg::new("input").required(true)));
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            r#"
[defaults.merge]
keep-lora = true
[[job]]
name = "part-${k}"
command = "merge"
each.k = [0, 1]
lora = ["a", "b:0.5"]
part = "${k}/2"
out = "o/"
"#,
        )
        .unwrap();
        let r = load(&recipe, &[], &cli).unwrap();
        assert_eq!(r.jobs.len(), 2);
        assert_eq!(
            r.jobs[1].options,
            [
                "--keep-lora",
                "--lora=a",
                "--lora=b:0.5",
                "--part=1/2",
                "--out=o/"
            ]
        );
        assert!(r.jobs.iter().all(|j| j.shared_output));
        assert_eq!(
            r.jobs[0].inputs,
            [dir.path().join("a"), dir.path().join("b")]
        );
        let records: Vec<_> = r.jobs.iter().map(super::super::record::path_of).collect();
        assert_ne!(records[0], records[1]);
        assert!(
            records[1]
                .as_ref()
                .unwrap()
                .ends_with("o.part-1.lorastream-job.json")
        );
        std::fs::write(
            &recipe,
            "[[job]]\ncommand = \"merge\"\nout = \"o/\"\npart = [1]\n",
        )
        .unwrap();
        let e = load(&recipe, &[], &cli).unwrap_err().to_string();
        assert!(e.contains("'part'") && e.contains("not a list"), "{e}");
    }

    #[test]
    fn wildcards_match_file_names() {
        assert!(wildcard("*.bin", "a.bin"));
        assert!(wildcard("m-??.bin", "m-01.bin"));
        assert!(!wildcard("*.bin", "a.bin.json"));
        assert!(wildcard("*a*b*", "xxaYYb"));
        assert!(!wildcard("*a*b", "xxaYYbc"));
        assert!(wildcard("*", ""));
    }

    #[test]
    fn input_values_name_their_paths() {
        let d = Path::new("/nonexistent-dir-for-test");
        assert_eq!(input_path("llm=a/b:0.5", d), "a/b");
        assert_eq!(input_path("a/b", d), "a/b");
        assert_eq!(input_path("9x=a", d), "9x=a");
    }

    #[test]
    fn lexical_paths_drop_dots() {
        assert_eq!(lexical(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_quote("--out=a/b"), "--out=a/b");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
