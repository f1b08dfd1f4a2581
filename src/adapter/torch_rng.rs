//! torch's CPU random stream (the default `CPUGeneratorImpl` after `torch.manual_seed`),
//! drawn the way `torch.bernoulli` and `Tensor.uniform_` draw it, so that DARE's random
//! masks (PEFT's `random_pruning`: `torch.bernoulli(torch.full_like(t, density))`) come out
//! bit for bit as PEFT's.
//!
//! Written by hand rather than taken from an mt19937 crate: what matters is torch's exact
//! stream (its seeding takes the low 32 bits of the 64-bit seed, `init_genrand` style; one
//! 32-bit output per float element, two per double; the uniform is formed from the low 24
//! or 53 bits), and being able to copy the 2.5 KB state at any point (the merge snapshots
//! it where each module's masks start, then draws them when the module is merged).
//!
//! What torch 2.x does (ATen/core/MT19937RNGEngine.h, DistributionsHelper.h,
//! TransformationHelper.h, native/cpu/DistributionTemplates.h), checked against real torch
//! by fixtures/torch_rng/bernoulli.json:
//!
//! - `manual_seed(s)`: `state[0] = s & 0xffffffff`, `state[j] = 1812433253·(state[j-1] ^
//!   state[j-1] >> 30) + j`; the first draw twists. Outputs are the standard tempered mt19937.
//! - `bernoulli(p)` with a float, half or bfloat16 `p` tensor: per element, in the
//!   row-major order of its shape (of a transposed view too: the result is contiguous),
//!   one 32-bit draw `x`, `u = (x & 0xffffff)·2⁻²⁴` (a float), kept when `u < float(p)`.
//!   With a double `p`: `random64` (two draws, the first the high word), `u` from its low
//!   53 bits, `u < p`.
//! - `uniform_` (also `kaiming_uniform_`, `nn.Linear`'s init): one draw per element for
//!   float, half and bfloat16, two for double.

use crate::dtype::{Dtype, round_through};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER: u32 = 0x8000_0000;
const LOWER: u32 = 0x7fff_ffff;

/// torch's mt19937 engine, with its state (copy it to resume the stream from here).
#[derive(Clone)]
pub struct TorchRng {
    state: Box<[u32; N]>,
    /// The next state word to temper; `N`: the next draw twists first.
    next: usize,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TorchRng(at {})", self.next)
    }
}

impl TorchRng {
    /// The state `torch.manual_seed(seed)` leaves.
    pub fn manual_seed(seed: u64) -> TorchRng {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32; // torch keeps only the low 32 bits
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchRng { state, next: N }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        let mix = |u: u32, v: u32| {
            let y = (u & UPPER) | (v & LOWER);
            (y >> 1) ^ if v & 1 != 0 { MATRIX_A } else { 0 }
        };
        for j in 0..N {
            s[j] = s[(j + M) % N] ^ mix(s[j], s[(j + 1) % N]);
        }
        self.next = 0;
    }

    /// One 32-bit output (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `CPUGeneratorImpl::random64`: two outputs, the first in the high word.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        (hi << 32) | self.next_u32() as u64
    }

    /// Advances by `n` outputs without tempering them.
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 {
            if self.next >= N {
                self.twist();
            }
            let take = ((N - self.next) as u64).min(n);
            self.next += take as usize;
            n -= take;
        }
    }

    /// One element of `torch.bernoulli` with a float/half/bfloat16 probability `p`
    /// (already in that dtype, as a float: see [`BernoulliP::of`]).
    pub fn bernoulli_f32(&mut self, p: f32) -> bool {
        let u = (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
        u < p
    }

    /// One element of `torch.bernoulli` with a double probability.
    pub fn bernoulli_f64(&mut self, p: f64) -> bool {
        let u = (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0);
        u < p
    }

    /// One element of `torch.bernoulli(torch.full_like(t, density))` for `t` of `p`'s dtype.
    pub fn bernoulli(&mut self, p: BernoulliP) -> bool {
        match p {
            BernoulliP::Float(p) => self.bernoulli_f32(p),
            BernoulliP::Double(p) => self.bernoulli_f64(p),
        }
    }
}

/// The probability `torch.full_like(t, density)` holds, as `bernoulli` reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BernoulliP {
    Float(f32),
    Double(f64),
}

impl BernoulliP {
    /// `density` stored in a tensor of `dtype` (double → float → half/bfloat16, as
    /// c10's scalar conversion rounds it).
    pub fn of(dtype: Dtype, density: f64) -> BernoulliP {
        match dtype {
            Dtype::F64 => BernoulliP::Double(density),
            Dtype::F16 | Dtype::BF16 => {
                let mut v = [density as f32];
                round_through(dtype, &mut v);
                BernoulliP::Float(v[0])
            }
            _ => BernoulliP::Float(density as f32),
        }
    }
}

/// The outputs torch's init calls use up, counted as they run (their values are not
/// needed, only where the stream stands after them).
#[derive(Clone, Debug, Default)]
pub struct DrawCount {
    pub total: u64,
    /// `normal_distribution<double>` keeps the second sample of each Box-Muller pair
    /// (`next_double_normal_sample`, cleared by `manual_seed`) for its next call.
    pub cached_normal: bool,
}

impl DrawCount {
    /// `uniform_` (and so `kaiming_uniform_`, `nn.Linear`'s init) on `n` elements of
    /// `dtype`: one output each, two for double.
    pub fn uniform(&mut self, dtype: Dtype, n: u64) {
        self.total += if dtype == Dtype::F64 { 2 * n } else { n };
    }

    /// `normal_` (and `randn`) of `n` contiguous f32 elements: from 16 on
    /// (`normal_fill`), a uniform per element plus 16 more when `n` is not a multiple of 16
    /// (the last 16 are redrawn); below, serially with the double sampler: two `random64`
    /// per pair, the second sample cached.
    pub fn normal(&mut self, n: u64) {
        if n >= 16 {
            self.total += n + if n.is_multiple_of(16) { 0 } else { 16 };
            return;
        }
        for _ in 0..n {
            if self.cached_normal {
                self.cached_normal = false;
            } else {
                self.total += 4;
                self.cached_normal = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn dtype(s: &str) -> Dtype {
        match s {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            "bf16" => Dtype::BF16,
            "f64" => Dtype::F64,
            other => panic!("fixture dtype {other}"),
        }
    }

    fn pack(bits: &[bool]) -> String {
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (i, &b) in bits.iter().enumerate() {
            if b {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_standard_mt19937_stream() {
        // std::mt19937 seeded 5489 (torch's default seed): its 10000th output is 4123659995.
        let mut r = TorchRng::manual_seed(5489);
        assert_eq!(r.next_u32(), 3_499_211_612);
        r.skip(9998);
        assert_eq!(r.next_u32(), 4_123_659_995);
    }

    #[test]
    fn skip_equals_drawing() {
        let mut a = TorchRng::manual_seed(7);
        let mut b = a.clone();
        for n in [0u64, 1, 623, 624, 625, 2000] {
            a.skip(n);
            for _ in 0..n {
                b.next_u32();
            }
            assert_eq!(a.next_u32(), b.next_u32(), "{n}");
        }
    }

    /// Every mask torch drew in fixtures/torch_rng/bernoulli.json (several seeds, f32, f16,
    /// bf16 and f64 probabilities, odd sizes, densities 0 and 1, masks after `uniform_`,
    /// `nn.Linear` init and `randn` of both paths, a mask of a transposed view, row-major)
    /// comes out the same.
    #[test]
    fn masks_equal_torchs() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/torch_rng/bernoulli.json"
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        let doc: Value = serde_json::from_str(&text).expect("json");
        let mut masks = 0;
        let mut count = DrawCount::default();
        let mut counted = 0u64;
        for case in doc["cases"].as_array().expect("cases") {
            let seed = case["seed"].as_u64().expect("seed");
            let mut rng = TorchRng::manual_seed(seed);
            count.cached_normal = false; // manual_seed clears it
            let expected = case["expected"].as_array().expect("expected");
            for (call, want) in case["calls"]
                .as_array()
                .expect("calls")
                .iter()
                .zip(expected)
            {
                let n = |c: &Value| -> u64 {
                    match c.get("shape") {
                        Some(s) => s
                            .as_array()
                            .expect("shape")
                            .iter()
                            .map(|d| d.as_u64().expect("dim"))
                            .product(),
                        None => c["n"].as_u64().expect("n"),
                    }
                };
                let op = call["op"].as_str().expect("op");
                if op == "bernoulli" {
                    // What the calls before used up.
                    rng.skip(count.total - counted);
                    counted = count.total;
                }
                match op {
                    "bernoulli" => {
                        let p = BernoulliP::of(
                            dtype(call["dtype"].as_str().expect("dtype")),
                            call["density"].as_f64().expect("density"),
                        );
                        let bits: Vec<bool> = (0..n(call)).map(|_| rng.bernoulli(p)).collect();
                        assert_eq!(
                            pack(&bits),
                            want.as_str().expect("mask"),
                            "seed {seed} {call}"
                        );
                        masks += 1;
                    }
                    "uniform" => {
                        count.uniform(dtype(call["dtype"].as_str().expect("dtype")), n(call))
                    }
                    "normal" => count.normal(n(call)),
                    "linear_init" => count.uniform(
                        Dtype::F32,
                        call["in"].as_u64().expect("in") * call["out"].as_u64().expect("out"),
                    ),
                    other => panic!("fixture op {other}"),
                }
            }
        }
        assert!(masks > 100, "{masks}");
    }
}
