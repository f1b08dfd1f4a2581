//! The `lorastream` command: parses arguments, calls the library, prints the result or
//! the one error. Exit codes: 0 success, 1 runtime error, 2 usage error (clap's and the
//! library's `Error::Usage`), 128+N when a signal ends the run; `verify` and `diff` answer
//! 0 same, 1 different, 2 cannot compare (as diff(1) does). With `--json` every outcome,
//! failures and usage errors included, is exactly one JSON object on stdout (`"ok"`,
//! the report or `"error"`, `"exit_code"`), so scripts read one shape (`run` prints JSON
//! lines instead: one per finished job, the summary last; src/recipe/). Every print goes
//! through a locked handle with its error handled: a reader that closes stdout early
//! (`| head`) ends the command quietly instead of a panic.
//!
//! The Python package compiles this same file into its extension (bindings/python, with
//! `#[path]`): its `lorastream` command calls [`cli_main`], its API [`parse`] and [`run`]
//! with `--json` among the arguments. Those stay `pub(crate)` and free of process exits.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use lorastream::adapter::combine::{COMBINATION_TYPES, CombinationType, Combine, MajoritySign};
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
use serde::Serialize;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lorastream",
    version,
    about = "Merge LoRA adapters into model weights and convert checkpoints by streaming \
             tensors through memory maps, without building the model.",
    after_help = "Exit codes: 0 success, 1 runtime error (bad input, I/O), 2 usage error \
                  (contradictory or impossible arguments), 128+N ended by signal N (130: Ctrl-C). \
                  verify and diff: 0 same, 1 different, 2 cannot compare.\n\n\
                  With --json, every outcome is one JSON object on stdout: {\"ok\": true, …report, \
                  \"exit_code\"} or {\"ok\": false, \"error\": {\"kind\", \"message\", \"file\", \
                  \"tensor\"}, \"exit_code\"}; error kinds: usage, not_found, io, input, plan, device, \
                  internal, interrupted."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every tensor of a checkpoint: name, dtype, shape, bytes, file.
    ///
    /// Tensors are listed in natural order (layers.2 before layers.10). For a PEFT adapter
    /// folder the adapter is described too: type (LoRA/DoRA), r, alpha, scale, targets,
    /// parameter count, and the config fields that matter for a merge. For a GGUF: each
    /// tensor's ggml type (stored) and stored bytes, dtype f32 for quantized types (as they
    /// are read, dequantized), and the metadata key/values.
    Inspect {
        /// The checkpoint to list: a .safetensors file, a PyTorch .pth/.pt/.bin, a sharded
        /// *.index.json, an HF model folder (safetensors preferred), a PEFT adapter folder
        /// or a .gguf.
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
    /// Tensors anywhere in a .pth input (nested dicts, lists, objects) are named by their
    /// path joined with '.'; non-tensor entries are skipped; no tensors at all is an error.
    /// Every tensor is copied byte for byte unless --dtype casts it.
    ///
    /// A .gguf input is read with its names and row order; quantized tensors are
    /// dequantized to f32 as the gguf package's gguf.quants does. A .gguf OUT needs a .gguf
    /// input: metadata and tensors are copied byte for byte, or re-encoded with --gguf-type.
    #[command(
        mut_arg("dtype", |a| a.help(
            "Cast floating tensors (F64/F32/F16/BF16) with round-to-nearest-even; keep = each \
             tensor's stored dtype. Integers, bools and float8 pass through")),
        mut_arg("renames", |a| a.help(
            "Rename keys: every match of REGEX is replaced, groups as $1; rules apply in order. \
             A rule that matches no key is reported in a note")),
        mut_arg("exclude", |a| a.help(
            "Leave out tensors whose key (after renames) matches REGEX, e.g. '^optimizer\\.'. \
             Repeatable; a pattern that matches no key is reported in a note")),
        mut_arg("verbose", |a| a.help(
            "Also print one line per tensor as it is written: key, dtype, shape, size, time taken")),
        mut_arg("requantize", |a| a.help(
            "fp8-block: for an FP8 block-scaled input (quant_method \"fp8\"), keep its layout: \
             every float8_e4m3fn weight and its X.weight_scale_inv copied as stored instead of \
             dequantized, config.json keeping quantization_config; other tensors follow --dtype. \
             Refused for an input without FP8 block-scaled weights, --part and .gguf outputs")),
        mut_arg("gguf_type", |a| a.help(
            "For a .gguf output: the ggml type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, \
             TQ2_0, MXFP4) every \
             tensor of two or more dimensions is re-encoded in, bit for bit as the gguf package's \
             gguf.quants.quantize does; 1-D tensors (norms, biases) keep their type. Default: each \
             tensor's stored type and bytes")),
        after_help = "Examples:\n  lorastream convert model.pth model.safetensors\n  \
        lorastream convert ckpt/ -o out/ --dtype bf16 --shard-size 2GB\n  \
        lorastream convert model.gguf model.safetensors\n  \
        lorastream convert model-f16.gguf model-q8.gguf --gguf-type Q8_0"
    )]
    Convert {
        /// The checkpoint to read: a .safetensors file, a PyTorch .pth/.pt/.bin, a sharded
        /// *.index.json, an HF model folder or a .gguf. A quantized model (config.json's
        /// quantization_config: fp8 block-scaled, bitsandbytes 4-bit/8-bit, mxfp4) is read
        /// dequantized, as its own library dequantizes it, and written bf16 unless --dtype
        /// (or kept FP8 with --requantize fp8-block); other quantizations are refused.
        input: PathBuf,
        /// Where to write (the format follows the name, see above); or give it with -o/--out.
        #[arg(required_unless_present = "out_path", conflicts_with = "out_path")]
        output: Option<PathBuf>,
        /// Where to write, as the positional OUTPUT (give one of the two).
        #[arg(short = 'o', long = "out", value_name = "OUT")]
        out_path: Option<PathBuf>,
        /// Write the output even when the input holds no tensors (by default that is an
        /// error: a training save whose tensors could not be found, say).
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        opts: OutputArgs,
    },
    /// Merge PEFT adapters (LoRA and every other PEFT tuner with a merge) into base weights, or keep them unmerged, and write one checkpoint.
    ///
    /// A component is an optional NAME with a base and/or adapters; every output key of
    /// component NAME is "NAME." + its key. `--lora NAME=DIR` applies to `--base NAME=PATH`;
    /// several --lora for one component merge one after another, in order (DoRA adapters
    /// after other LoRA adapters as in one PeftModel: earlier ones unmerged for its norm), or with --combine TYPE and
    /// --lora DIR:WEIGHT as one weighted combination (PEFT's add_weighted_adapter).
    ///
    /// Default: merged: each targeted weight becomes W + s·ΔW with PEFT's semantics
    /// (Linear, Conv1D, Embedding, Conv, 2-D and 3-D nn.Parameters (MoE experts; the layout
    /// of square experts from config.json or --fan-in-fan-out meaning [E, in, out]), rsLoRA, rank/alpha patterns,
    /// DoRA, lora_bias, MiCA, BD-LoRA, VeLoRA, MonteCLoRA, modules_to_save, saved biases),
    /// computed in f32 and rounded into the weight's dtype where PEFT rounds; tied weights
    /// get the merged value under every name; every other tensor is copied byte for byte.
    /// A square weight's layout ([out, in] or Conv1D's [in, out]) comes from the base's
    /// config.json or --fan-in-fan-out / --no-fan-in-fan-out, never from the adapter's
    /// fan_in_fan_out flag; what nothing settles is refused. With --keep-lora the output
    /// holds the keys of PEFT's `PeftModel.state_dict()` instead (…lora_A.default.weight,
    /// …base_layer.weight), adapter tensors in f32 as PEFT holds them.
    ///
    /// Other tuners (peft_type LOHA, LOKR, IA3, OFT, BOFT, HRA, VERA, ADALORA, FOURIERFT,
    /// ... — the README's list) merge exactly as PEFT's merge_and_unload() does, band by
    /// band on the CPU; options whose merge cannot be reproduced are refused by name.
    ///
    /// A quantized --base (fp8 block-scaled, bitsandbytes nf4/fp4/int8, mxfp4; see the
    /// README's "Quantized bases") is merged into its dequantized weights; the output holds
    /// them dequantized (bf16 by default for every format, or --dtype) and a folder output's
    /// config.json loses its quantization_config; --requantize fp8-block writes an FP8
    /// base's layout again instead.
    ///
    /// A .gguf --out takes one .gguf --base and one plain LoRA adapter trained on the HF
    /// model (architectures llama/Mistral, qwen2, qwen3, gemma, gemma2, gemma3): modules
    /// renamed to the GGUF's tensors (blk.N.attn_q, …), llama's q/k rows permuted as convert_hf_to_gguf.py
    /// permutes them; merged tensors written in their stored type or --gguf-type, every
    /// other tensor and all metadata copied as stored.
    #[command(
        after_help = "Example (XTuner LLaVA, continue the released LoRA training):\n  \
        lorastream merge --lora llm=R/llm_adapter --lora visual_encoder=R/visual_encoder_adapter \\\n    \
        --base projector=R/projector --keep-lora --out llava.pth\n\
        Example (GGUF):\n  \
        lorastream merge --base model-f16.gguf --lora adapter/ --out merged-q8.gguf --gguf-type Q8_0"
    )]
    Merge {
        /// Output: .pth/.pt/.bin, .safetensors, or a folder ending in '/' (sharded).
        #[arg(short = 'o', long)]
        out: PathBuf,
        #[command(flatten)]
        components: ComponentArgs,
        /// Write the adapters unmerged, keyed as PeftModel.state_dict() (one adapter per component).
        #[arg(long)]
        keep_lora: bool,
        /// Before writing, fail unless the output keys are exactly REF's: every output key
        /// is in REF (a checkpoint: same shape too; a .txt file: one key per line) and every
        /// key of REF is in the output (a forgotten or misspelt component).
        #[arg(long, value_name = "REF")]
        expect_keys_from: Option<PathBuf>,
        /// With --expect-keys-from: allow an output that lacks some of REF's keys (they are
        /// listed in a note); output keys REF lacks still fail.
        #[arg(long, requires = "expect_keys_from")]
        allow_missing_keys: bool,
        /// Write merged tensors even where the merge creates inf/NaN (by default a merge
        /// that turns a finite weight non-finite, e.g. an f16 overflow, fails naming the
        /// tensor; values already non-finite where the merge starts, in the base or its replacement, are never counted).
        #[arg(long)]
        allow_non_finite: bool,
        /// Worker threads for the CPU merge (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where to compute deltas: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: Device,
        /// Run every check a real run runs before writing (plan, adapter coverage, dtypes,
        /// --expect-keys-from, output folder writable, free space), write nothing, probe no
        /// GPU unless --device cuda asks for one. With -v every planned tensor is listed;
        /// with --json the report lists them and what is applied to each.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        combine: CombineArgs,
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
    /// Join the parts of a partitioned folder output (--part K/N) into the finished folder.
    ///
    /// Checks that the manifests of all N parts are in DIR/.lorastream/, that they describe
    /// one plan (same inputs, options, --shard-size and N), that each part wrote the shards
    /// the plan deals it, and that every shard has the size and SHA-256 its manifest
    /// records; then moves the config and tokenizer files beside the shards, writes
    /// model.safetensors.index.json and removes DIR/.lorastream/. The result is byte for byte
    /// what a single run with the same options writes. Missing or inconsistent parts: exit 1,
    /// naming them (rerun those parts, then stitch again); nothing is changed.
    #[command(after_help = "Example (4 parts, on any machines sharing out/):
          lorastream merge --base B/ --lora A/ --out out/ --part 0/4   # … and 1/4, 2/4, 3/4
          lorastream stitch out/")]
    Stitch {
        /// The output folder the parts were written into.
        dir: PathBuf,
        /// Print one JSON object on stdout: the report or the failure.
        #[arg(long)]
        json: bool,
        /// No summary line: only errors (and, with --json, the JSON object).
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a batch recipe: a TOML list of merge/convert jobs, resumable.
    ///
    /// Every key of a [[job]] is one of the command's own options, by its long name
    /// (shard_size or shard-size for --shard-size; input/output for convert's positional
    /// arguments; true/false for a flag, a list for a repeatable option), with shared
    /// [defaults] ([defaults.merge], [defaults.convert]) and ${var} substitution ([vars],
    /// --var, ${env.NAME}, ${recipe_dir}; each.VAR = [values] or { glob = "dir/*.bin" }
    /// makes one job per value). Relative paths are relative to the recipe's folder. Every
    /// job is checked by the command's own parser before anything runs. Each job runs as a
    /// child `lorastream merge|convert ... --json`; once it succeeds, a record beside its
    /// output (OUT.lorastream-job.json) notes the options and the inputs' paths, sizes and
    /// modification times, and a re-run skips every job whose record still matches.
    #[command(
        after_help = "Exit codes: 0 every job ok or skipped, 1 a job failed (or was not \
        run after one), 2 a bad recipe (nothing ran), 128+N stopped by signal N (forwarded \
        to the running jobs, which remove their unfinished outputs).\n\n\
        With --json: one JSON line per finished job ({\"job\", \"index\", \"command\", \
        \"status\": ok|skipped|failed|interrupted, \"seconds\", \"exit_code\", \"report\": the \
        job's own --json object}) and a summary line last ({\"ok\", \"recipe\", \"jobs\", \
        \"succeeded\", \"skipped\", \"failed\", \"not_run\", ..., \"exit_code\"}).\n\n\
        Examples:\n  lorastream run batch.toml --jobs 2 --keep-going\n  \
        lorastream run batch.toml --var base=/models/llama --dry-run"
    )]
    Run {
        /// The recipe (TOML): [vars], [defaults] and [[job]] tables (see the README).
        recipe: PathBuf,
        /// Run up to N jobs at a time (each is its own process; mind memory and disk).
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// After a failed job, start the remaining jobs anyway (default: start no new job
        /// after a failure; running ones finish).
        #[arg(long)]
        keep_going: bool,
        /// List what would run and what would be skipped as complete, and why; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run every job, also those whose record says they are complete.
        #[arg(long)]
        force: bool,
        /// Set recipe variable NAME (overrides [vars]); repeatable.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// JSON lines on stdout: one per finished job, the summary last.
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
        /// The first checkpoint (any readable format).
        a: PathBuf,
        /// The second checkpoint (any readable format).
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
    /// groups as $1; rules apply in order. A rule that matches no key is reported in a note.
    #[arg(long = "rename", value_name = "REGEX=REPLACEMENT", value_parser = parse_rename)]
    renames: Vec<RenameRule>,
    /// Leave out tensors whose final key (after prefixes and renames) matches REGEX, e.g.
    /// '^visual_encoder\.text_model\.' for a full CLIP checkpoint. Repeatable; a pattern
    /// that matches no key is reported in a note.
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
    /// Print one JSON object on stdout at the end, the report or the failure (and no
    /// progress bar).
    #[arg(long)]
    json: bool,
    /// No progress bar, notes or summary: only errors (and, with --json, the JSON object).
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
    /// Draw the progress bar (on a terminal) also with --json.
    #[arg(long, conflicts_with = "quiet")]
    progress: bool,
    /// Also print one line per tensor as it is written: key, merged or copied, dtype,
    /// shape, size, time taken (with --dry-run: every planned tensor).
    #[arg(short, long)]
    verbose: bool,
    /// Write a folder output into a folder that already holds checkpoint files; those the
    /// new output does not replace are removed once it is in place.
    #[arg(long)]
    overwrite: bool,
    /// Do not copy the other files of the HF model folder the weights come from (config,
    /// tokenizer, code) into a folder output: weights only.
    #[arg(long)]
    no_copy_files: bool,
    /// Write only part K of N (0 <= K < N) of a folder output: every part plans the same
    /// shards as a single run and writes its share (balanced by bytes), plus a manifest in
    /// OUT/.lorastream/; `lorastream stitch OUT/` then joins them into exactly the single
    /// run's folder. `auto`: K and N from a Slurm job array (SLURM_ARRAY_TASK_ID,
    /// SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN) or a Kubernetes Indexed Job
    /// (JOB_COMPLETION_INDEX with LORASTREAM_PARTS).
    #[arg(long, value_name = "K/N|auto")]
    part: Option<String>,
    /// For a .gguf output: the ggml type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0,
    /// TQ2_0, MXFP4) that
    /// `convert` writes every tensor of two or more dimensions in (1-D tensors, norms and
    /// biases, keep their type) and `merge` the merged tensors in, encoded bit for bit as
    /// the gguf package's gguf.quants.quantize does. Default: each tensor's stored type
    /// (copied tensors keep their bytes).
    #[arg(long, value_name = "TYPE", value_parser = lorastream::gguf_job::parse_gguf_type)]
    gguf_type: Option<lorastream::source::gguf::quants::GgmlType>,
    /// fp8-block: for an FP8 block-scaled base (quant_method "fp8"), write its layout
    /// again instead of dequantized weights: each merged weight re-quantized as
    /// transformers' Fp8Quantize does (per weight_block_size block: scale = 448 / amax,
    /// X.weight float8_e4m3fn + X.weight_scale_inv f32) from the merge in the output dtype
    /// (bf16 by default), every unmerged fp8 weight and its scales copied as stored, and
    /// config.json keeping quantization_config. Error vs the bf16 merge: at most 1/28 of
    /// the block's amax (e4m3's half ulp at 448) plus bf16 rounding; measured on the test
    /// models 0.037·amax at most, mean relative error 2.2%. Refused for non-FP8 bases,
    /// merged weights that are not whole blocks, --keep-lora, --part and .gguf outputs.
    #[arg(long, value_name = "fp8-block", value_parser = parse_requantize)]
    requantize: Option<lorastream::plan::requantize::Requantize>,
}

fn parse_requantize(s: &str) -> Result<lorastream::plan::requantize::Requantize, String> {
    lorastream::plan::requantize::Requantize::parse(s)
        .ok_or_else(|| format!("unknown --requantize '{s}' (known: fp8-block)"))
}

/// `--part`: K/N, or `auto` from the scheduler's variables.
fn part_of(spec: Option<&str>) -> Result<Option<lorastream::partition::Part>, Error> {
    spec.map(|s| lorastream::partition::Part::parse(s, |k| std::env::var(k).ok()))
        .transpose()
}

/// How square 2-D weights are laid out, where the base's own description does not say:
/// shared by `merge` and `verify`.
#[derive(clap::Args)]
struct LayoutArgs {
    /// Modules (regex over names relative to the base model, e.g. 'attn\.c_proj$')
    /// whose 2-D weights are stored [in, out] like transformers' Conv1D (for a 3-D experts
    /// parameter: [E, in, out], an is_transposed module). Needed only for square weights
    /// that the base's config.json does not settle; repeatable.
    #[arg(long = "fan-in-fan-out", value_name = "REGEX", value_parser = parse_regex)]
    fan_in_fan_out: Vec<Regex>,
    /// Modules (regex) whose 2-D weights are stored [out, in] like nn.Linear (3-D experts:
    /// [E, out, in], PEFT's default); e.g. '.' for a model without Conv1D. Repeatable.
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

/// The components of a merge (`merge` and `verify`): bases and adapters, by NAME.
#[derive(clap::Args)]
struct ComponentArgs {
    /// Base weights of a component: [NAME=]PATH (file, *.index.json or HF folder). An
    /// argument that is an existing path as a whole is that path.
    #[arg(long = "base", value_name = "[NAME=]PATH")]
    bases: Vec<String>,
    /// A PEFT adapter folder (or a file in it) for a component: [NAME=]DIR[:WEIGHT]. Repeat
    /// to merge several in order (or, with --combine, as one weighted combination: WEIGHT is
    /// the adapter's weight there). An argument that is an existing path as a whole is that
    /// path.
    #[arg(long = "lora", value_name = "[NAME=]DIR[:WEIGHT]")]
    loras: Vec<String>,
}

/// `[NAME=]PATH` arguments, split.
fn split_all(specs: &[String]) -> Vec<(Option<String>, PathBuf)> {
    specs.iter().map(|s| split_named(s)).collect()
}

/// `--lora [NAME=]DIR[:WEIGHT]`: the weight (a number after the last ':') split off, unless
/// the whole argument is an existing path.
fn split_weights(specs: &[String]) -> (Vec<String>, Vec<Option<f64>>) {
    specs
        .iter()
        .map(|s| {
            if std::path::Path::new(s).exists() {
                return (s.clone(), None);
            }
            match s.rsplit_once(':') {
                Some((head, w)) if !head.is_empty() => match w.parse::<f64>() {
                    Ok(w) if w.is_finite() => (head.to_string(), Some(w)),
                    _ => (s.clone(), None),
                },
                _ => (s.clone(), None),
            }
        })
        .unzip()
}

/// `--combine` and its options (PEFT's `add_weighted_adapter`): shared by merge and verify.
#[derive(clap::Args)]
struct CombineArgs {
    /// Merge each component's adapters as ONE weighted combination, exactly as PEFT's
    /// add_weighted_adapter(adapters, weights, combination_type=TYPE) followed by the merge
    /// of the new adapter; weights come from --lora DIR:WEIGHT (every adapter needs one).
    /// cat and linear build new LoRA factors; ties and magnitude_prune prune each factor to
    /// --density first (ties: majority sign by --majority-sign-method); svd, ties_svd and
    /// magnitude_prune_svd cut the combined delta to the largest rank (f64 SVD; PEFT's f32
    /// one differs by about 1e-6 absolute on f32 weights; pruned SVD forms for modules up
    /// to 1024 on their shorter side). dare_linear, dare_ties, dare_linear_svd and
    /// dare_ties_svd prune at random with PEFT's exact masks given --seed and the model's
    /// module order (--module-order, or a pickle .bin/.pth base, which keeps it); Linear,
    /// Conv1D and Embedding modules (convolutions refused).
    #[arg(long, value_name = "TYPE", value_parser = parse_combination)]
    combine: Option<CombinationType>,
    /// The fraction of values kept by ties / magnitude_prune / dare_* and their _svd forms
    /// (0..1; >= 1 prunes nothing; dare_* keeps each value with this probability and
    /// divides the kept ones by it).
    #[arg(long, value_name = "FRACTION")]
    density: Option<f64>,
    /// How ties elects each value's sign: total (sum of the values) or frequency (count).
    #[arg(long, value_name = "total|frequency", default_value = "total", value_parser = parse_majority)]
    majority_sign_method: MajoritySign,
    /// dare_*: the seed of the torch.manual_seed(N) run just before add_weighted_adapter
    /// (torch keeps its low 32 bits); the masks are torch's CPU bernoulli draws from there.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// dare_*: a text file of the model's module names in model.named_modules() order, one
    /// a line (the first word of each line, a leading "base_model.model." dropped; it must
    /// list every combined module, other names are ignored). Settles the order PEFT draws
    /// the masks in, which a safetensors base does not record; a single-file pickle base
    /// (.bin/.pth, state_dict order) settles it without this.
    #[arg(long, value_name = "FILE")]
    module_order: Option<PathBuf>,
}

impl CombineArgs {
    fn combine(&self) -> std::result::Result<Option<Combine>, Failed> {
        match self.combine {
            Some(kind) => Ok(Some(Combine {
                kind,
                density: self.density,
                majority: self.majority_sign_method,
                seed: self.seed,
                module_order: self.module_order.clone(),
            })),
            None if self.density.is_some()
                || self.seed.is_some()
                || self.module_order.is_some() =>
            {
                Err(
                    Error::Usage("--density, --seed and --module-order go with --combine".into())
                        .into(),
                )
            }
            None => Ok(None),
        }
    }
}

fn parse_combination(s: &str) -> Result<CombinationType, String> {
    CombinationType::parse(s).ok_or_else(|| {
        format!(
            "unknown combination type '{s}'; one of {}",
            COMBINATION_TYPES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn parse_majority(s: &str) -> Result<MajoritySign, String> {
    match s {
        "total" => Ok(MajoritySign::Total),
        "frequency" => Ok(MajoritySign::Frequency),
        _ => Err(format!("'{s}': total or frequency")),
    }
}

/// The merge's options as `verify` takes them (those of `merge` that shape the output).
#[derive(clap::Args)]
struct VerifyMergeArgs {
    #[command(flatten)]
    components: ComponentArgs,
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
    #[command(flatten)]
    combine: CombineArgs,
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

/// What a finished command leaves: the text for stdout (a report, or one JSON object)
/// and the exit code.
pub(crate) struct Done {
    pub(crate) stdout: String,
    pub(crate) code: u8,
}

/// A failed command: the error and the exit code it ends with (verify and diff: 2).
pub(crate) struct Failed {
    pub(crate) error: Error,
    pub(crate) code: u8,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        let code = error.exit_code();
        Failed { error, code }
    }
}

/// One line on stderr. A closed stderr is no reason to fail (or panic) the command.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn note_line(note: &str) {
    say(&format!("note: {note}"));
}

fn trace_line(line: &str) {
    say(line);
}

/// The success object of `--json`: `"ok": true`, the report's fields, `"exit_code"`.
fn ok_json(report: &impl Serialize, code: u8) -> String {
    let mut out = serde_json::Map::new();
    out.insert("ok".into(), true.into());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(report) {
        out.extend(fields);
    }
    out.insert("exit_code".into(), code.into());
    format!("{}\n", serde_json::Value::Object(out))
}

/// For a `--part` run, the summary: what this part writes (the report's totals are the
/// whole output's). False (nothing printed) for other runs.
fn part_line(
    part: Option<&lorastream::partition::PartReport>,
    out: &str,
    dry_run: bool,
    seconds: f64,
) -> bool {
    let Some(p) = part else {
        return false;
    };
    let names: Vec<&str> = p.shards.iter().map(|s| s.name.as_str()).collect();
    let (verb, then) = if dry_run {
        ("would write", String::new())
    } else {
        (
            "wrote",
            format!(" in {seconds:.2}s; once every part is done: lorastream stitch OUT"),
        )
    };
    say(&format!(
        "part {}/{} of OUT {verb} {} of {} shards ({}), {} tensors, {}{}",
        p.part,
        p.parts,
        names.len(),
        p.shards_total,
        if names.is_empty() {
            "none: more parts than shards".to_string()
        } else {
            names.join(", ")
        },
        p.tensors,
        size(p.bytes),
        then
    )
    .replace("OUT", out));
    true
}

/// "12.3 GiB", as the progress bar counts.
fn size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// Whether the command asks for `--json` output.
fn wants_json(c: &Command) -> bool {
    match c {
        Command::Inspect { json, .. }
        | Command::Verify { json, .. }
        | Command::Diff { json, .. }
        | Command::Stitch { json, .. } => *json,
        Command::Convert { opts, .. } => opts.json,
        Command::Merge { output, .. } => output.json,
        Command::Run { json, .. } => *json,
    }
}

/// Whether the subcommand's argument `id` was given on the command line (not defaulted).
fn given(matches: &clap::ArgMatches, id: &str) -> bool {
    matches.subcommand().is_some_and(|(_, m)| {
        m.try_get_raw(id).is_ok_and(|v| v.is_some())
            && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    })
}

/// `--shard-size` only shapes a sharded (folder) output: given for a single file, the
/// command line contradicts itself.
fn check_shard_size(out: &std::path::Path, shard_size_given: bool) -> Result<(), Error> {
    use lorastream::sink::OutputFormat;
    match OutputFormat::from_path(out) {
        Ok(OutputFormat::ShardedSafetensors) | Err(_) => Ok(()),
        Ok(_) if shard_size_given => Err(Error::Usage(format!(
            "--shard-size applies to sharded folder outputs only, and {} is one file; drop \
             --shard-size, or name a folder ending in '/'",
            out.display()
        ))),
        Ok(_) => Ok(()),
    }
}

/// How `run` (the recipe command) starts its jobs and where its JSON lines go. The
/// binary runs its own executable, catches stop signals and prints each line as a job
/// ends. In the Python package the executable is the interpreter, so it names the
/// program that runs a job; its API also keeps Python's signal handling (it cancels
/// through `lorastream::cancel`) and collects the lines.
pub(crate) struct RecipeHost<'a> {
    /// The jobs' program and the arguments before the job's command; None: this
    /// executable.
    pub(crate) program: Option<(PathBuf, Vec<OsString>)>,
    /// Catch stop signals and forward them to the jobs.
    pub(crate) catch_signals: bool,
    pub(crate) emit: &'a mut dyn FnMut(&str),
}

/// The binary's host: prints each JSON line as it comes (as the jobs finish, not at the
/// end) and catches stop signals.
fn print_line(line: &str) {
    print_stdout(&format!("{line}\n"), 0);
}

/// Runs the command; a recipe's jobs as `host` says.
pub(crate) fn run_hosted(
    cli: Cli,
    component_order: Vec<Option<String>>,
    shard_size_given: bool,
    host: &mut RecipeHost<'_>,
) -> Result<Done, Failed> {
    let done = |stdout: String| Ok(Done { stdout, code: 0 });
    match cli.command {
        Command::Inspect { path, json } => {
            let report = inspect::inspect(&path)?;
            if json {
                done(ok_json(&report, 0))
            } else {
                done(report.to_text())
            }
        }
        Command::Convert {
            input,
            output,
            out_path,
            allow_empty,
            opts: out,
        } => {
            let output = match (output, out_path) {
                (Some(o), None) | (None, Some(o)) => o,
                // clap refuses both and neither; kept as a usage error for library callers.
                _ => {
                    return Err(Error::Usage(
                        "convert takes one output: the positional OUTPUT or -o/--out".into(),
                    )
                    .into());
                }
            };
            check_shard_size(&output, shard_size_given)?;
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
                progress: (!out.json || out.progress) && !out.quiet,
                notify: (!out.quiet).then_some(note_line as fn(&str)),
                trace: (out.verbose && !out.quiet).then_some(trace_line as fn(&str)),
                no_copy_files: out.no_copy_files,
                allow_empty,
                part: part_of(out.part.as_deref())?,
                requantize: out.requantize,
            };
            if out.requantize.is_some() && lorastream::gguf_job::is_gguf_path(&output) {
                return Err(Error::Usage(
                    "--requantize fp8-block writes safetensors or .pth, not .gguf".into(),
                )
                .into());
            }
            let report = if lorastream::gguf_job::is_gguf_path(&output) {
                lorastream::gguf_job::convert(&input, &output, &opts, out.gguf_type)?
            } else if out.gguf_type.is_some() {
                return Err(
                    Error::Usage("--gguf-type applies to a .gguf output only".into()).into(),
                );
            } else {
                pipeline::convert(&input, &output, &opts)?
            };
            if out.json {
                return done(ok_json(&report, 0));
            }
            if !out.quiet && !part_line(report.part.as_ref(), &report.output, false, report.seconds)
            {
                say(&format!(
                    "wrote {} ({} tensors, {}) in {:.2}s, peak RSS {} MB",
                    report.output,
                    report.tensors,
                    size(report.bytes),
                    report.seconds,
                    report.peak_rss_bytes / 1_000_000
                ));
            }
            done(String::new())
        }
        Command::Merge {
            out,
            components,
            keep_lora,
            expect_keys_from,
            allow_missing_keys,
            allow_non_finite,
            threads,
            device,
            dry_run,
            layout,
            combine,
            output,
        } => {
            let (json, quiet) = (output.json, output.quiet);
            check_shard_size(&out, shard_size_given)?;
            let (loras, lora_weights) = split_weights(&components.loras);
            let opts = MergeOptions {
                bases: split_all(&components.bases),
                loras: split_all(&loras),
                lora_weights,
                component_order,
                settings: MergeSettings {
                    keep_lora,
                    gguf: None,
                    dtype: output.dtype,
                    renames: output.renames,
                    exclude: output.exclude,
                    layout: layout.flags(),
                    combine: combine.combine()?,
                    requantize: output.requantize,
                },
                expect_keys_from,
                allow_missing_keys,
                allow_non_finite,
                threads,
                device,
                sink: SinkOptions {
                    shard_size: output.shard_size,
                    direct_io: !output.buffered_io,
                    overwrite: output.overwrite,
                },
                reads: read_mode(output.buffered_io),
                dry_run,
                progress: (!json || output.progress) && !quiet,
                notify: (!quiet).then_some(note_line as fn(&str)),
                trace: (output.verbose && !quiet).then_some(trace_line as fn(&str)),
                no_copy_files: output.no_copy_files,
                part: part_of(output.part.as_deref())?,
            };
            if output.requantize.is_some() && lorastream::gguf_job::is_gguf_path(&out) {
                return Err(Error::Usage(
                    "--requantize fp8-block writes safetensors or .pth, not .gguf".into(),
                )
                .into());
            }
            let r = if lorastream::gguf_job::is_gguf_path(&out) {
                lorastream::gguf_job::merge(&out, &opts, output.gguf_type)?
            } else if output.gguf_type.is_some() {
                return Err(
                    Error::Usage("--gguf-type applies to a .gguf output only".into()).into(),
                );
            } else {
                lorastream::merge::merge(&out, &opts)?
            };
            if json {
                return done(ok_json(&r, 0));
            }
            if quiet {
                return done(String::new());
            }
            // One unnamed component is the whole output: the total line says it all.
            let rows = r.components.len() > 1 || r.components.iter().any(|c| c.name.is_some());
            // Adapter tensors used / present (every one must be used: see plan/coverage.rs).
            let cover = |adapters: &[lorastream::merge::AdapterReport]| {
                let (used, present) = adapters.iter().fold((0, 0), |(u, p), a| {
                    (u + a.coverage.used, p + a.coverage.tensors)
                });
                if adapters.is_empty() {
                    String::new()
                } else {
                    format!(", adapter tensors used {used}/{present}")
                }
            };
            for c in r.components.iter().filter(|_| rows) {
                say(&format!(
                    "{:<16} {:>6} tensors, {:>6} merged, {:>10}{}",
                    c.name.as_deref().unwrap_or("(unnamed)"),
                    c.tensors,
                    c.merged,
                    size(c.bytes),
                    cover(&c.adapters)
                ));
            }
            if !rows && let Some(c) = r.components.first() {
                let line = cover(&c.adapters);
                if !line.is_empty() {
                    say(line.trim_start_matches(", "));
                }
            }
            if part_line(r.part.as_ref(), &r.output, r.dry_run, r.seconds) {
                // The part's own line; the totals are the whole output's.
            } else if r.dry_run {
                say(&format!(
                    "dry run: would write {} ({} tensors, {} merged, {}), device {}",
                    r.output,
                    r.tensors,
                    r.merged,
                    size(r.bytes),
                    r.device
                ));
            } else {
                // "none": nothing was computed (a copy-only run), so no device to name.
                let on = match r.device.as_str() {
                    "none" => String::new(),
                    d => format!(" on {d}"),
                };
                say(&format!(
                    "wrote {} ({} tensors, {} merged, {}) in {:.2}s{on}, peak RSS {} MB",
                    r.output,
                    r.tensors,
                    r.merged,
                    size(r.bytes),
                    r.seconds,
                    r.peak_rss_bytes / 1_000_000
                ));
            }
            done(String::new())
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
            let (loras, lora_weights) = split_weights(&merge.components.loras);
            let opts = VerifyOptions {
                merge: MergeOptions {
                    bases: split_all(&merge.components.bases),
                    loras: split_all(&loras),
                    lora_weights,
                    component_order,
                    settings: MergeSettings {
                        keep_lora: merge.keep_lora,
                        gguf: None,
                        dtype: merge.dtype,
                        renames: merge.renames,
                        exclude: merge.exclude,
                        layout: merge.layout.flags(),
                        combine: merge.combine.combine()?,
                        requantize: None,
                    },
                    threads: merge.threads,
                    device: merge.device,
                    reads: read_mode(merge.buffered_io),
                    progress: !json,
                    notify: Some(note_line),
                    ..Default::default()
                },
                tolerance,
                sample,
            };
            // Anything that stops the check is "cannot check" (2), not "differs" (1).
            let r = verify::verify(&out, &opts).map_err(|error| Failed { error, code: 2 })?;
            let code = u8::from(!r.matches);
            if json {
                return Ok(Done {
                    stdout: ok_json(&r, code),
                    code,
                });
            }
            for n in r.notes.iter().filter(|n| n.contains(" is not in OUT")) {
                note_line(n);
            }
            Ok(Done {
                stdout: r.to_text(),
                code,
            })
        }
        Command::Stitch { dir, json, quiet } => {
            let r = lorastream::stitch::stitch(&dir)?;
            if json {
                return done(ok_json(&r, 0));
            }
            if !quiet {
                say(&format!(
                    "stitched {} ({} parts, {} shards, {} tensors, {}) in {:.2}s",
                    r.output,
                    r.parts,
                    r.shards,
                    r.tensors,
                    size(r.bytes),
                    r.seconds
                ));
            }
            done(String::new())
        }
        Command::Run {
            recipe,
            jobs,
            keep_going,
            dry_run,
            force,
            vars,
            json,
        } => {
            let recipe = lorastream::recipe::load(&recipe, &vars, &Cli::command())?;
            let (exe, exe_args) = match host.program.take() {
                Some(program) => program,
                None => {
                    let exe = std::env::current_exe().map_err(|e| {
                        Error::Internal(format!("cannot find this program's executable: {e}"))
                    })?;
                    (exe, Vec::new())
                }
            };
            let opts = lorastream::recipe::RunOptions {
                jobs: usize::from(jobs),
                keep_going,
                dry_run,
                force,
                json,
                exe,
                exe_args,
                catch_signals: host.catch_signals,
            };
            let summary = lorastream::recipe::run(&recipe, &opts, &mut *host.emit);
            Ok(Done {
                stdout: String::new(),
                code: summary.exit_code,
            })
        }
        Command::Diff { a, b, exact, json } => {
            let r = diff::diff(&a, &b, exact).map_err(|error| Failed { error, code: 2 })?;
            let code = u8::from(!r.identical);
            let stdout = if json { ok_json(&r, code) } else { r.to_text() };
            Ok(Done { stdout, code })
        }
    }
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

/// Whether `--json` is on the command line `args` (before a `--`), for errors found
/// before the arguments are parsed into a command.
fn json_on_command_line(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Writes `text` to stdout. Returns the exit code to end with: `code`, also when the
/// reader closed the pipe (`| head`: a quiet end, as other Unix tools do); 1 when stdout
/// cannot be written for another reason.
fn print_stdout(text: &str, code: u8) -> u8 {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            say(&format!("error: writing to stdout: {e}"));
            1
        }
    }
}

/// The one-line message of a clap usage error, as the `--json` failure object gives it.
pub(crate) fn usage_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .trim()
        .to_string()
}

/// A clap error (bad arguments, or --help/--version, which clap reports the same way).
fn clap_failure(e: clap::Error, args: &[OsString]) -> u8 {
    let _ = e.print();
    if !e.use_stderr() {
        // --help or --version: printed on stdout, success.
        return e.exit_code().clamp(0, 255) as u8;
    }
    let code = 2;
    if json_on_command_line(args) {
        let v = lorastream::error::failure_json("usage", &usage_message(&e), None, None, code);
        return print_stdout(&format!("{v}\n"), code);
    }
    code
}

/// Parses the command line `args` (the program name first) into the command, the order
/// its components are named in and whether --shard-size was given.
pub(crate) fn parse(args: &[OsString]) -> Result<(Cli, Vec<Option<String>>, bool), clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((
        cli,
        component_order(&matches),
        given(&matches, "shard_size"),
    ))
}

/// The whole command for `args` (the program name first): parses, runs, prints, returns
/// the exit code. `main` minus the signal handlers, which the caller installs; also the
/// entry point of the Python package's `lorastream` command.
/// `program`: what runs a recipe's jobs (None: this executable; see [`RecipeHost`]).
pub(crate) fn cli_main(args: &[OsString], program: Option<(PathBuf, Vec<OsString>)>) -> u8 {
    let (cli, order, shard_size_given) = match parse(args) {
        Ok(p) => p,
        Err(e) => return clap_failure(e, args),
    };
    let json = wants_json(&cli.command);
    lorastream::error::set_json_output(json);
    let mut print = print_line;
    let mut host = RecipeHost {
        program,
        catch_signals: true,
        emit: &mut print,
    };
    match run_hosted(cli, order, shard_size_given, &mut host) {
        Ok(Done { stdout, code }) => print_stdout(&stdout, code),
        Err(Failed { error, code }) => {
            say(&format!("error: {error}"));
            if json {
                let text = format!("{}\n", error.to_json(code));
                return print_stdout(&text, code);
            }
            code
        }
    }
}

/// Installs the binary's stop-signal handlers (unfinished output removed, exit 128+N),
/// except for `run`, which forwards stop signals to its jobs itself (recipe/runner.rs).
pub(crate) fn install_signal_handlers(args: &[OsString]) {
    let is_run = args.get(1).is_some_and(|a| a == "run");
    if !is_run {
        lorastream::sink::install_interrupt_cleanup();
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    install_signal_handlers(&args);
    ExitCode::from(cli_main(&args, None))
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
    fn every_positional_argument_is_described() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for a in sub.get_positionals() {
                assert!(
                    a.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{} <{}> has no description",
                    sub.get_name(),
                    a.get_id()
                );
            }
        }
    }

    #[test]
    fn json_objects_have_the_documented_shape() {
        let e = Error::tensor("f.pth", "w", "bad");
        let v = e.to_json(1);
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["kind"], "input");
        assert_eq!(v["error"]["file"], "f.pth");
        assert_eq!(v["error"]["tensor"], "w");
        assert_eq!(v["exit_code"], 1);
        let ok: serde_json::Value =
            serde_json::from_str(&ok_json(&serde_json::json!({"tensors": 3}), 0)).unwrap();
        let keys: Vec<&String> = ok.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ok", "tensors", "exit_code"]);
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
