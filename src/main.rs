//! The `lorastream` command: parses arguments, calls the library, prints the result or
//! the one error. Exit codes: 0 success, 1 runtime error, 2 usage error.

use clap::{Parser, Subcommand};
use lorastream::pipeline::{self, ConvertOptions};
use lorastream::plan::{DtypeChoice, RenameRule};
use lorastream::sink::SinkOptions;
use lorastream::{Error, inspect};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lorastream",
    version,
    about = "Merge LoRA adapters into model weights and convert checkpoints by streaming \
             tensors through memory maps, without building the model.",
    after_help = "Exit codes: 0 success, 1 runtime error (bad input, I/O), 2 usage error."
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
    /// with mmap=True), .safetensors → one safetensors file, a folder (existing and empty,
    /// or a path ending in '/') → HF sharded safetensors with model.safetensors.index.json.
    /// Nested dicts in .pth inputs are flattened with '.'; non-tensor entries are skipped.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Cast floating tensors (F64/F32/F16/BF16); integers, bools and float8 pass through.
        #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|f16|f32")]
        dtype: DtypeChoice,
        /// Rename keys: every match of REGEX is replaced (groups as $1); rules apply in order.
        #[arg(long = "rename", value_name = "REGEX=REPLACEMENT", value_parser = parse_rename)]
        renames: Vec<RenameRule>,
        /// Largest shard of a sharded output (e.g. 5GB, 500MB, 2GiB, or bytes).
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        shard_size: u64,
        /// Print one JSON report on stdout at the end.
        #[arg(long)]
        json: bool,
    },
}

fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    DtypeChoice::parse(s).ok_or_else(|| format!("'{s}' is not one of keep, bf16, f16, f32"))
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

fn run(cli: Cli) -> Result<(), Error> {
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
        Command::Convert {
            input,
            output,
            dtype,
            renames,
            shard_size,
            json,
        } => {
            let opts = ConvertOptions {
                dtype,
                renames,
                sink: SinkOptions { shard_size },
                progress: !json,
            };
            let report = pipeline::convert(&input, &output, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
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
    }
    Ok(())
}

fn main() -> ExitCode {
    lorastream::sink::install_interrupt_cleanup();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
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
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
