//! Kernel compilation: `kernels/merge.cu` is embedded and compiled by NVRTC at run time
//! for the device's architecture (`compute_XY` PTX, JIT-compiled by the driver; a
//! `sm_XY` cubin when the driver cannot load NVRTC's PTX), once per architecture and
//! process, and loaded as the module whose functions the band pipeline launches.

use super::library::{driver_error, nvrtc_present, one_line};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::{CString, c_char};
use std::sync::{Arc, Mutex};

/// The kernels' source, compiled by NVRTC at run time.
pub const KERNEL_SOURCE: &str = include_str!("../../../kernels/merge.cu");

/// Every `extern "C"` kernel in [`KERNEL_SOURCE`].
pub const KERNEL_NAMES: [&str; 4] = [
    "ls_factor_f32",
    "ls_lora_band",
    "ls_dora_rows",
    "ls_col_sumsq",
];

/// What NVRTC made of [`KERNEL_SOURCE`].
#[derive(Debug, Clone)]
pub struct Compiled {
    /// PTX text (NUL-terminated) for `compute_XY`, a cubin for `sm_XY`.
    pub image: Vec<u8>,
    pub is_cubin: bool,
    /// NVRTC's log (warnings; with `--ptxas-options=-v`, registers and spills per kernel).
    pub log: String,
}

impl Compiled {
    /// The PTX as text (empty for a cubin).
    pub fn ptx(&self) -> &str {
        if self.is_cubin {
            return "";
        }
        let end = self
            .image
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.image.len());
        std::str::from_utf8(&self.image[..end]).unwrap_or("")
    }
}

fn c_text(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Compiles the kernels for `arch`: `compute_XY` gives PTX, `sm_XY` a cubin (which runs
/// NVRTC's built-in ptxas, so inline PTX and register allocation are checked too).
/// `extra` options are appended (e.g. `--ptxas-options=-v`).
pub fn compile(arch: &str, extra: &[&str]) -> std::result::Result<Compiled, String> {
    if !nvrtc_present() {
        return Err("libnvrtc not found".into());
    }
    let is_cubin = arch.starts_with("sm_");
    let src = CString::new(KERNEL_SOURCE).map_err(|_| "kernel source holds a NUL byte")?;
    let name = CString::new("merge.cu").map_err(|_| "bad program name")?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--generate-line-info".to_string(),
        "--std=c++17".to_string(),
    ];
    opts.extend(extra.iter().map(|s| s.to_string()));
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| format!("NVRTC: {e}"))?;
    // SAFETY: `prog` is live until destroy_program below; src/name outlive it.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|v| c_text(&v))
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(format!(
            "NVRTC could not compile kernels/merge.cu for {arch} ({e}): {log}"
        )),
        Ok(()) if is_cubin => {
            let mut size = 0usize;
            // SAFETY: prog compiled; the buffer is sized by NVRTC's answer.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| format!("NVRTC: no cubin for {arch}: {e}"))
                .and_then(|_| {
                    let mut buf = vec![0u8; size];
                    // SAFETY: buf holds `size` bytes.
                    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
                        .result()
                        .map_err(|e| format!("NVRTC: no cubin for {arch}: {e}"))
                        .map(|_| buf)
                })
        }
        Ok(()) => {
            // SAFETY: prog compiled.
            unsafe { nvrtc::get_ptx(prog) }
                .map(|v| v.iter().map(|&c| c as u8).collect::<Vec<u8>>())
                .map_err(|e| format!("NVRTC: no PTX for {arch}: {e}"))
        }
    };
    // SAFETY: prog is not used afterwards.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out.map(|image| Compiled {
        image,
        is_cubin,
        log,
    })
}

/// The loaded kernels (every name in [`KERNEL_NAMES`]).
pub(super) struct Kernels {
    pub factor: CudaFunction,
    pub lora: CudaFunction,
    pub dora_rows: CudaFunction,
    pub col_sumsq: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the cache) and loads the kernels for compute capability
    /// `major.minor`.
    pub(super) fn load(
        ctx: &Arc<CudaContext>,
        major: i32,
        minor: i32,
    ) -> std::result::Result<Kernels, String> {
        let module = load_kernels(ctx, major, minor)?;
        let f = |n: &str| {
            module
                .load_function(n)
                .map_err(|e| driver_error(&format!("kernel {n}"), e))
        };
        Ok(Kernels {
            factor: f("ls_factor_f32")?,
            lora: f("ls_lora_band")?,
            dora_rows: f("ls_dora_rows")?,
            col_sumsq: f("ls_col_sumsq")?,
        })
    }
}

/// [`compile`] once per architecture and process (tests and library users may open many
/// backends).
fn compile_cached(arch: &str) -> std::result::Result<Vec<u8>, String> {
    static CACHE: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());
    if let Ok(c) = CACHE.lock()
        && let Some((_, image)) = c.iter().find(|(a, _)| a == arch)
    {
        return Ok(image.clone());
    }
    let image = compile(arch, &[])?.image;
    if let Ok(mut c) = CACHE.lock() {
        c.push((arch.to_string(), image.clone()));
    }
    Ok(image)
}

/// Compiles for the device and loads the module: PTX for compute_XY (or compute_80 when
/// this NVRTC does not know the device), then a cubin when the driver rejects the PTX.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    major: i32,
    minor: i32,
) -> std::result::Result<Arc<cudarc::driver::CudaModule>, String> {
    let cc = format!("{major}{minor}");
    let ptx = compile_cached(&format!("compute_{cc}")).or_else(|e| {
        if major * 10 + minor > 80 {
            compile_cached("compute_80")
        } else {
            Err(e)
        }
    });
    let mut why = String::new();
    match ptx {
        Ok(image) => match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)) {
            Ok(m) => return Ok(m),
            Err(e) => why = format!("the driver rejected NVRTC's PTX ({e})"),
        },
        Err(e) => why.push_str(&one_line(&e)),
    }
    let cubin =
        compile_cached(&format!("sm_{cc}")).map_err(|e| format!("{why}; {}", one_line(&e)))?;
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
        .map_err(|e| format!("{why}; the cubin did not load either ({e})"))
}
