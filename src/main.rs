//! The `lorastream` command: parses arguments, calls the library, prints the result or
//! the one error. Exit codes: 0 success, 1 runtime error, 2 usage error; `verify` and
//! `diff` answer 0 same, 1 different, 2 cannot compare (as diff(1) does).

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use lorastream::compare::Tolerance;
use lorastream::direct_io::ReadMode;
use lorastream::merge::{Device, MergeOptions, split_named};
use lorastream::pipeline::{self, ConvertOptions};
use lorastream::plan::layout::LayoutFlags;
use lorastream::plan::merge::MergeSettings;
use lorastream::plan::{DtypeChoice, RenameRule};
use lorastream::sink::SinkOptions;
use lorastream::verify::{self, VerifyOptions};
use lorastream::{Error, diff, inspect};
use regex::Regex;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lorastream",
    version,
    about = "Merge LoRA adapters into model weights and convert checkpoints by streaming \
             tensors through memory maps, without building the model.",
    after_help = "Exit codes: 0 success, 1 runtime error (bad input, I/O), 2 usage error. \
                  verify and diff: 0 same, 1 different, 2 cannot compare."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every tensor of a checkpoint: name, dtype, shape, bytes, file.
    ///
    /// PATH may be a .safetensors file, a PyTorch .pth/.pt/.bin, a sharded *.index.json,
    /// an HF model folder (safetensors preferred) or a PEFT adapter folder (its config is
    /// shown too).
    Inspect {
        path: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite a checkpoint in another format, dtype or naming.
    ///
    /// The output format follows OUT: .pth/.pt/.bin → PyTorch zip (torch.load-able, also
    /// with mmap=True), .safetensors → one safetensors file, a folder (existing, or a path
    /// ending in '/') → HF sharded safetensors with model.safetensors.index.json, plus the
    /// input folder's config and tokenizer files when the input is an HF model folder.
    /// Nested dicts in .pth inputs are flattened with '.'; non-tensor entries are skipped.
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Merge PEFT LoRA adapters into base weights (or keep them unmerged) and write one checkpoint.
    ///
    /// A component is an optional NAME with a base and/or adapters; every output key of
    /// component NAME is "NAME." + its key. `--lora NAME=DIR` applies to `--base NAME=PATH`;
    /// several --lora for one component merge one after another, in order.
    ///
    /// Default: merged: each targeted weight becomes W + s·ΔW with PEFT's semantics
    /// (Linear, Conv1D, Embedding, Conv, rsLoRA, rank/alpha patterns, DoRA, lora_bias,
    /// modules_to_save, saved biases), computed in f32 and rounded into the weight's dtype;
    /// every other tensor is copied byte for byte. With --keep-lora the output holds the
    /// keys of PEFT's `PeftModel.state_dict()` instead (…lora_A.default.weight,
    /// …base_layer.weight), adapter tensors in f32 as PEFT holds them.
    #[command(
        after_help = "Example (XTuner LLaVA, continue the released LoRA training):\n  \
        lorastream merge --lora llm=R/llm_adapter --lora visual_encoder=R/visual_encoder_adapter \\\n    \
        --base projector=R/projector --keep-lora --out llava.pth"
    )]
    Merge {
        /// Output: .pth/.pt/.bin, .safetensors, or a folder ending in '/' (sharded).
        #[arg(long)]
        out: PathBuf,
        /// Base weights of a component: [NAME=]PATH (file, *.index.json or HF folder).
        #[arg(long = "base", value_name = "[NAME=]PATH")]
        bases: Vec<String>,
        /// A PEFT adapter folder for a component: [NAME=]DIR. Repeat to merge several in order.
        #[arg(long = "lora", value_name = "[NAME=]DIR")]
        loras: Vec<String>,
        /// Write the adapters unmerged, keyed as PeftModel.state_dict() (one adapter per component).
        #[arg(long)]
        keep_lora: bool,
        /// Before writing, fail unless every output key exists in REF (a checkpoint: same
        /// shape too; a .txt file: one key per line).
        #[arg(long, value_name = "REF")]
        expect_keys_from: Option<PathBuf>,
        /// Worker threads for the CPU merge (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where to compute deltas: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: Device,
        /// Plan and check everything, print the plan, write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Check an existing merge output: recompute the merge, compare value by value, write nothing.
    ///
    /// OUT may be any readable checkpoint (ours, a PEFT save_pretrained folder, .safetensors,
    /// .pth/.bin, a sharded index). Takes the merge's options (not --out). Compares every
    /// tensor the merge plans with OUT's tensor of the same name, streaming, in bounded
    /// memory. Default tolerance (the merge's fidelity contract): per element, both NaN, or
    /// at most 1 ulp apart, or, for f32/f64, |a-b| <= 1e-5*max(|a|,|b|); integer, bool,
    /// float8 tensors bit for bit. A tensor of another dtype or shape in OUT differs.
    /// Keys the merge produces that OUT lacks are missing, keys of OUT it does not produce
    /// are extra (both differ), except a dropped tied output embedding (lm_head.weight)
    /// whose recomputed values equal OUT's input embedding: reported as tied, not a failure.
    #[command(
        after_help = "Exit codes: 0 OUT matches, 1 OUT differs (each differing tensor \
        listed: dtype, differing elements, max ulp, max |a-b|; missing and extra keys), 2 cannot \
        check (OUT or inputs unreadable, bad arguments).\n\nExamples:\n  \
        lorastream verify merged/ --base Llama-3-8B/ --lora my-adapter/\n  \
        lorastream verify merged.safetensors --base m.safetensors --lora a/ --exact\n  \
        lorastream verify merged/ --base big/ --lora a/ --sample 64 --json"
    )]
    Verify {
        /// The output to check.
        out: PathBuf,
        #[command(flatten)]
        merge: VerifyMergeArgs,
        /// Compare bit for bit instead of within the tolerance.
        #[arg(long, conflicts_with = "max_ulp")]
        exact: bool,
        /// Accept at most N ulp in every float element (instead of the default rule).
        #[arg(long, value_name = "N")]
        max_ulp: Option<u64>,
        /// Check only ROWS rows of every tensor (evenly spread, the first and the last
        /// always among them), computing only those rows: for very large models.
        #[arg(long, value_name = "ROWS")]
        sample: Option<usize>,
        /// Print one JSON object instead of the text report.
        #[arg(long)]
        json: bool,
    },
    /// Compare two checkpoints tensor by tensor (any readable formats), like diff(1).
    ///
    /// Reports keys only in A or only in B, dtype and shape changes, and for tensors of
    /// the same shape the number of differing elements, max |a-b| and (same float dtype)
    /// max ulp. Elements compare by value (+0 equals -0, NaN equals NaN; across dtypes,
    /// both widened exactly); --exact compares bits. Streams in bounded memory.
    #[command(
        after_help = "Exit codes: 0 identical, 1 different, 2 trouble (unreadable \
        input, bad arguments).\n\nExamples:\n  lorastream diff merged.safetensors peft-merged/\n  \
        lorastream diff a.pth b.safetensors --json"
    )]
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Compare bits instead of values.
        #[arg(long)]
        exact: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// What to write and how to report it: shared by `convert` and `merge`.
#[derive(clap::Args)]
struct OutputArgs {
    /// Cast floating outputs (F64/F32/F16/BF16; after merging) with round-to-nearest-even;
    /// keep = each tensor's stored dtype. Integers, bools and float8 pass through.
    #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|f16|f32")]
    dtype: DtypeChoice,
    /// Rename final keys (after component prefixes): every match of REGEX is replaced,
    /// groups as $1; rules apply in order.
    #[arg(long = "rename", value_name = "REGEX=REPLACEMENT", value_parser = parse_rename)]
    renames: Vec<RenameRule>,
    /// Leave out tensors whose final key (after prefixes and renames) matches REGEX, e.g.
    /// '^visual_encoder\.text_model\.' for a full CLIP checkpoint. Repeatable.
    #[arg(long = "exclude", value_name = "REGEX", value_parser = parse_exclude)]
    exclude: Vec<Regex>,
    /// Largest shard of a sharded output (e.g. 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    shard_size: u64,
    /// Read inputs and write the output through the page cache. By default the output
    /// and big reads of inputs that are not already cached bypass it (O_DIRECT) where the
    /// filesystem allows: that saves the CPU a kernel copy per byte and leaves the cache
    /// alone.
    #[arg(long)]
    buffered_io: bool,
    /// Print one JSON report on stdout at the end (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Write a folder output into a folder that already holds checkpoint files; those the
    /// new output does not replace are removed once it is in place.
    #[arg(long)]
    overwrite: bool,
    /// Do not copy the input's (convert) or base's (merge) HF model folder files
    /// (config, tokenizer, code) into a folder output: weights only.
    #[arg(long)]
    no_copy_files: bool,
}

/// How square 2-D weights are laid out, where the base's own description does not say:
/// shared by `merge` and `verify`.
#[derive(clap::Args)]
struct LayoutArgs {
    /// Modules (regex over names relative to the base model, e.g. 'attn\.c_proj$')
    /// whose 2-D weights are stored [in, out] like transformers' Conv1D. Needed only for
    /// square weights that the base's config.json does not settle; repeatable.
    #[arg(long = "fan-in-fan-out", value_name = "REGEX", value_parser = parse_regex)]
    fan_in_fan_out: Vec<Regex>,
    /// Modules (regex) whose 2-D weights are stored [out, in] like nn.Linear; e.g. '.'
    /// for a model without Conv1D. Repeatable.
    #[arg(long = "no-fan-in-fan-out", value_name = "REGEX", value_parser = parse_regex)]
    no_fan_in_fan_out: Vec<Regex>,
}

impl LayoutArgs {
    fn flags(self) -> LayoutFlags {
        LayoutFlags {
            fan_in_fan_out: self.fan_in_fan_out,
            not_fan_in_fan_out: self.no_fan_in_fan_out,
        }
    }
}

/// The merge's options as `verify` takes them (those of `merge` that shape the output).
#[derive(clap::Args)]
struct VerifyMergeArgs {
    /// Base weights of a component: [NAME=]PATH (file, *.index.json or HF folder).
    #[arg(long = "base", value_name = "[NAME=]PATH")]
    bases: Vec<String>,
    /// A PEFT adapter folder for a component: [NAME=]DIR. Repeat to merge several in order.
    #[arg(long = "lora", value_name = "[NAME=]DIR")]
    loras: Vec<String>,
    /// The output was written with --keep-lora.
    #[arg(long)]
    keep_lora: bool,
    /// The --dtype the output was merged with (keep = each tensor's stored dtype).
    #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|f16|f32")]
    dtype: DtypeChoice,
    /// The --rename rules the output was merged with, in order.
    #[arg(long = "rename", value_name = "REGEX=REPLACEMENT", value_parser = parse_rename)]
    renames: Vec<RenameRule>,
    /// The --exclude patterns the output was merged with (final keys left out).
    #[arg(long = "exclude", value_name = "REGEX", value_parser = parse_exclude)]
    exclude: Vec<Regex>,
    /// Worker threads for the CPU merge (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute deltas: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// Read the inputs and OUT through the page cache (default: big reads bypass it
    /// where the filesystem allows).
    #[arg(long)]
    buffered_io: bool,
    #[command(flatten)]
    layout: LayoutArgs,
}

fn read_mode(buffered: bool) -> ReadMode {
    if buffered {
        ReadMode::Buffered
    } else {
        ReadMode::Auto
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    Device::parse(s).ok_or_else(|| format!("'{s}' is not one of auto, cpu, cuda, cuda:N"))
}

fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    DtypeChoice::parse(s).ok_or_else(|| format!("'{s}' is not one of keep, bf16, f16, f32"))
}

fn parse_exclude(s: &str) -> Result<Regex, String> {
    lorastream::plan::rename::parse_exclude(s).map_err(|e| e.to_string())
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("not a regular expression: {e}"))
}

fn parse_rename(s: &str) -> Result<RenameRule, String> {
    RenameRule::parse(s).map_err(|e| e.to_string())
}

/// Sizes like HF's `max_shard_size`: `5GB` = 5·10⁹, `2GiB` = 2·2³⁰, plain numbers are bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 5GB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "'{s}': unknown unit (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let v = (num * mult).round();
    if v < 1.0 {
        return Err(format!("'{s}' must be at least 1 byte"));
    }
    Ok(v as u64)
}

/// Runs the command; the exit code when it did not fail (verify and diff: 0 or 1).
fn run(cli: Cli, component_order: Vec<Option<String>>) -> Result<u8, Error> {
    match cli.command {
        Command::Inspect { path, json } => {
            let report = inspect::inspect(&path)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Convert { input, output, out } => {
            let opts = ConvertOptions {
                dtype: out.dtype,
                renames: out.renames,
                exclude: out.exclude,
                sink: SinkOptions {
                    shard_size: out.shard_size,
                    direct_io: !out.buffered_io,
                    overwrite: out.overwrite,
                },
                reads: read_mode(out.buffered_io),
                progress: !out.json,
                no_copy_files: out.no_copy_files,
            };
            let report = pipeline::convert(&input, &output, &opts)?;
            if out.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                report.notes.iter().for_each(|n| eprintln!("note: {n}"));
                eprintln!(
                    "wrote {} ({} tensors, {} bytes) in {:.2}s, peak RSS {} MB",
                    report.output,
                    report.tensors,
                    report.bytes,
                    report.seconds,
                    report.peak_rss_bytes / 1_000_000
                );
            }
        }
        Command::Merge {
            out,
            bases,
            loras,
            keep_lora,
            expect_keys_from,
            threads,
            device,
            dry_run,
            layout,
            output,
        } => {
            let json = output.json;
            let opts = MergeOptions {
                bases: bases.iter().map(|s| split_named(s)).collect(),
                loras: loras.iter().map(|s| split_named(s)).collect(),
                component_order,
                settings: MergeSettings {
                    keep_lora,
                    dtype: output.dtype,
                    renames: output.renames,
                    exclude: output.exclude,
                    layout: layout.flags(),
                },
                expect_keys_from,
                threads,
                device,
                sink: SinkOptions {
                    shard_size: output.shard_size,
                    direct_io: !output.buffered_io,
                    overwrite: output.overwrite,
                },
                reads: read_mode(output.buffered_io),
                dry_run,
                progress: !json,
                no_copy_files: output.no_copy_files,
                notify: Some(|note| eprintln!("note: {note}")),
            };
            let r = lorastream::merge::merge(&out, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                for c in &r.components {
                    eprintln!(
                        "{:<16} {:>6} tensors, {:>6} merged, {:>14} bytes",
                        c.name.as_deref().unwrap_or("(unnamed)"),
                        c.tensors,
                        c.merged,
                        c.bytes
                    );
                }
                if r.dry_run {
                    eprintln!(
                        "dry run: would write {} ({} tensors, {} bytes) on {}",
                        r.output, r.tensors, r.bytes, r.device
                    );
                } else {
                    eprintln!(
                        "wrote {} ({} tensors, {} merged, {} bytes) in {:.2}s on {}, peak RSS {} MB",
                        r.output,
                        r.tensors,
                        r.merged,
                        r.bytes,
                        r.seconds,
                        r.device,
                        r.peak_rss_bytes / 1_000_000
                    );
                }
            }
        }
        Command::Verify {
            out,
            merge,
            exact,
            max_ulp,
            sample,
            json,
        } => {
            let tolerance = match (exact, max_ulp) {
                (true, _) => Tolerance::Exact,
                (false, Some(n)) => Tolerance::MaxUlp(n),
                (false, None) => Tolerance::Contract,
            };
            let opts = VerifyOptions {
                merge: MergeOptions {
                    bases: merge.bases.iter().map(|s| split_named(s)).collect(),
                    loras: merge.loras.iter().map(|s| split_named(s)).collect(),
                    component_order,
                    settings: MergeSettings {
                        keep_lora: merge.keep_lora,
                        dtype: merge.dtype,
                        renames: merge.renames,
                        exclude: merge.exclude,
                        layout: merge.layout.flags(),
                    },
                    threads: merge.threads,
                    device: merge.device,
                    reads: read_mode(merge.buffered_io),
                    progress: !json,
                    notify: Some(|note| eprintln!("note: {note}")),
                    ..Default::default()
                },
                tolerance,
                sample,
            };
            // Anything that stops the check is "cannot check" (2), not "differs" (1).
            let r = match verify::verify(&out, &opts) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                for n in r.notes.iter().filter(|n| n.contains(" is not in OUT")) {
                    eprintln!("note: {n}");
                }
                print!("{}", r.to_text());
            }
            return Ok(u8::from(!r.matches));
        }
        Command::Diff { a, b, exact, json } => {
            let r = match diff::diff(&a, &b, exact) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print!("{}", r.to_text());
            }
            return Ok(u8::from(!r.identical));
        }
    }
    Ok(0)
}

/// Component names in the order the user first named them across --base and --lora
/// (clap keeps the two lists apart; their positions on the command line tell the order).
fn component_order(matches: &clap::ArgMatches) -> Vec<Option<String>> {
    let m = match matches.subcommand() {
        Some(("merge", m)) => m,
        Some(("verify", v)) => v,
        _ => return Vec::new(),
    };
    let mut seen: Vec<(usize, Option<String>)> = Vec::new();
    for id in ["bases", "loras"] {
        let values = m.get_many::<String>(id).into_iter().flatten();
        let indices = m.indices_of(id).into_iter().flatten();
        for (v, i) in values.zip(indices) {
            seen.push((i, split_named(v).0));
        }
    }
    seen.sort_by_key(|(i, _)| *i);
    let mut order: Vec<Option<String>> = Vec::new();
    for (_, name) in seen {
        if !order.contains(&name) {
            order.push(name);
        }
    }
    order
}

fn main() -> ExitCode {
    lorastream::sink::install_interrupt_cleanup();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, component_order(&matches)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_hf() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn components_keep_command_line_order() {
        let m = Cli::command()
            .try_get_matches_from([
                "lorastream",
                "merge",
                "--lora",
                "llm=a",
                "--lora",
                "vis=b",
                "--base",
                "proj=c",
                "--base",
                "llm=d",
                "--out",
                "o.pth",
            ])
            .unwrap();
        let names = ["llm", "vis", "proj"].map(|n| Some(n.to_string()));
        assert_eq!(component_order(&m), names.to_vec());
    }

    #[test]
    fn verify_takes_the_merge_options_and_their_order() {
        let m = Cli::command()
            .try_get_matches_from([
                "lorastream",
                "verify",
                "out/",
                "--lora",
                "vis=b",
                "--base",
                "llm=d",
                "--sample",
                "8",
                "--max-ulp",
                "4",
            ])
            .unwrap();
        let names = ["vis", "llm"].map(|n| Some(n.to_string()));
        assert_eq!(component_order(&m), names.to_vec());
        // --exact and --max-ulp say different things.
        let both = Cli::command().try_get_matches_from([
            "lorastream",
            "verify",
            "o",
            "--base",
            "b",
            "--exact",
            "--max-ulp",
            "1",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
