//! WaveFT (`peft_type: "WAVEFT"`): ΔW is the inverse 2-D discrete wavelet transform (one
//! level) of sparse trained coefficients, or with `use_idwt: false` the sparse coefficients
//! themselves (PEFT 0.21 `tuners/waveft/layer.py`, `waverec2d.py`).
//!
//! Saved: `<module>.waveft_spectrum` `[n]` only; the positions are PEFT's draw from
//! `random_loc_seed` (`torch.randperm(out · in)[:n]` as `(idx // in, idx % in)`, reproduced
//! as for FourierFT). With `use_idwt` (the default) PEFT pads `[out, in]` by the family's
//! `WAVELET_REDUCTIONS` (to even sizes), centres the coefficients in it, splits the padded
//! matrix into its quadrants (cA, cH | cV, cD), runs `conv_transpose2d` (stride 2) with the
//! four outer-product filters of `rec_lo` / `rec_hi` (f32, products rounded in f32), crops
//! `(2L − 3) // 2` on every side and then the centre `[out, in]`, and scales by `scaling`;
//! the merge adds it (transposed for a Conv1D), one rounding into W's dtype.
//!
//! Here each band's rows of ΔW are computed directly from the coefficients that reach them
//! (each touches an `L × L` patch), with PEFT's f32 filter products, summed in f64 and
//! rounded once, then scaled in f32. torch's f32 `conv_transpose2d` sums in its own order,
//! so f32 merges can differ by its round-off (the rows file's ULP_OVERRIDE, measured).
//! Filters: PEFT's minimal PyWavelets table (generated from peft 0.21.2's `wavelet.py`:
//! every family with a `WAVELET_REDUCTIONS` entry; `haar` has none and PEFT cannot merge it).
//! As for FourierFT the coefficients' count fits a weight either way round, so the layout
//! of every weight is settled by the plan's evidence (`config.json` or the flags).

use super::fourierft::{spectrum_part, torch_randperm_prefix};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, decode, split_part,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "WAVEFT",
    open,
};

/// (family, padding rows, padding cols, rec_lo) from peft 0.21.2 `waveft/wavelet.py` and
/// `constants.py` (coiflets already scaled by √2 as PEFT does).
// PEFT's table verbatim (db1 is 1/√2, written as PEFT writes it).
#[rustfmt::skip]
#[allow(clippy::approx_constant)]
const WAVELETS: &[(&str, usize, usize, &[f64])] = &[
    ("db1", 0, 0, &[0.7071067811865476, 0.7071067811865476]),
    ("db2", 2, 2, &[0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037]),
    ("db3", 4, 4, &[0.33267055295008263, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149, 0.035226291882100656]),
    ("db4", 6, 6, &[0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854, -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032]),
    ("db5", 8, 8, &[0.16010239797419293, 0.6038292697971896, 0.7243085284377729, 0.13842814590132074, -0.24229488706638203, -0.032244869584638375, 0.07757149384004572, -0.006241490212798274, -0.012580751999081999, 0.0033357252854737712]),
    ("db6", 10, 10, &[0.11154074335010947, 0.49462389039845306, 0.7511339080210954, 0.31525035170919763, -0.22626469396543983, -0.12976686756726194, 0.09750160558732304, 0.027522865530305727, -0.03158203931748603, 0.0005538422011614961, 0.004777257510945511, -0.0010773010853084796]),
    ("db7", 12, 12, &[0.07785205408500918, 0.3965393194819173, 0.7291320908462351, 0.4697822874051931, -0.14390600392856498, -0.22403618499387498, 0.07130921926683026, 0.08061260915108308, -0.03802993693501441, -0.01657454163066688, 0.01255099855609984, 0.0004295779729213665, -0.0018016407040474908, 0.00035371379997452024]),
    ("db8", 14, 14, &[0.05441584224310401, 0.31287159091429995, 0.6756307362972898, 0.5853546836542067, -0.015829105256349306, -0.2840155429615469, 0.0004724845739132828, 0.12874742662047847, -0.017369301001807547, -0.044088253930794755, 0.013981027917398282, 0.008746094047405777, -0.004870352993451574, -0.00039174037337694705, 0.0006754494064505693, -0.00011747678412476953]),
    ("db9", 16, 16, &[0.038077947363878345, 0.24383467461259034, 0.6048231236901112, 0.6572880780513005, 0.13319738582500756, -0.2932737832791749, -0.09684078322297646, 0.14854074933810638, 0.03072568147933338, -0.06763282906132997, 0.00025094711483145197, 0.022361662123679096, -0.004723204757751397, -0.00428150368246343, 0.0018476468830562265, 0.00023038576352319597, -0.0002519631889427101, 3.93473203162716e-05]),
    ("db10", 18, 18, &[0.026670057900555554, 0.1881768000776915, 0.5272011889317256, 0.6884590394536035, 0.2811723436605775, -0.24984642432731538, -0.19594627437737705, 0.12736934033579325, 0.09305736460357235, -0.07139414716639708, -0.029457536821875813, 0.033212674059341, 0.0036065535669561697, -0.010733175483330575, 0.001395351747052901, 0.001992405295185056, -0.0006858566949597116, -0.00011646685512928545, 9.358867032006959e-05, -1.3264202894521244e-05]),
    ("sym2", 2, 2, &[0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145]),
    ("sym3", 4, 4, &[0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149, 0.035226291882100656]),
    ("sym4", 6, 6, &[0.0322231006040427, -0.012603967262037833, -0.09921954357684722, 0.29785779560527736, 0.8037387518059161, 0.49761866763201545, -0.02963552764599851, -0.07576571478927333]),
    ("sym5", 8, 8, &[0.019538882735286728, -0.021101834024758855, -0.17532808990845047, 0.01660210576452232, 0.6339789634582119, 0.7234076904024206, 0.1993975339773936, -0.039134249302383094, 0.029519490925774643, 0.027333068345077982]),
    ("sym6", 10, 10, &[-0.007800708325034148, 0.0017677118642428036, 0.04472490177066578, -0.021060292512300564, -0.07263752278646252, 0.3379294217276218, 0.787641141030194, 0.4910559419267466, -0.048311742585633, -0.11799011114819057, 0.0034907120842174702, 0.015404109327027373]),
    ("sym7", 12, 12, &[0.010268176708511255, 0.004010244871533663, -0.10780823770381774, -0.14004724044296152, 0.2886296317515146, 0.767764317003164, 0.5361019170917628, 0.017441255086855827, -0.049552834937127255, 0.0678926935013727, 0.03051551316596357, -0.01263630340325193, -0.0010473848886829163, 0.002681814568257878]),
    ("sym8", 14, 14, &[0.0018899503327594609, -0.0003029205147213668, -0.01495225833704823, 0.003808752013890615, 0.049137179673607506, -0.027219029917056003, -0.05194583810770904, 0.3644418948353314, 0.7771857517005235, 0.4813596512583722, -0.061273359067658524, -0.1432942383508097, 0.007607487324917605, 0.03169508781149298, -0.0005421323317911481, -0.0033824159510061256]),
    ("sym9", 16, 16, &[0.0010694900329086053, -0.0004731544986800831, -0.010264064027633142, 0.008859267493400484, 0.06207778930288603, -0.018233770779395985, -0.19155083129728512, 0.035272488035271894, 0.6173384491409358, 0.717897082764412, 0.238760914607303, -0.05456895843083407, 0.0005834627461258068, 0.03022487885827568, -0.01152821020767923, -0.013271967781817119, 0.0006197808889855868, 0.0014009155259146807]),
    ("sym10", 18, 18, &[-0.0004593294210046588, 5.7036083618494284e-05, 0.004593173585311828, -0.0008043589320165449, -0.02035493981231129, 0.005764912033581909, 0.04999497207737669, -0.0319900568824278, -0.03553674047381755, 0.38382676106708546, 0.7695100370211071, 0.47169066693843925, -0.07088053578324385, -0.15949427888491757, 0.011609893903711381, 0.0459272392310922, -0.0014653825813050513, -0.008641299277022422, 9.563267072289475e-05, 0.0007701598091144901]),
    ("coif1", 4, 4, &[-0.07273261951252645, 0.3378976624574818, 0.8525720202116004, 0.3848648468648578, -0.07273261951252645, -0.015655728135791993]),
    ("coif2", 10, 10, &[0.01638733646320364, -0.04146493678687178, -0.0673725547237256, 0.3861100668227629, 0.8127236354494135, 0.4170051844232391, -0.07648859907828076, -0.05943441864643109, 0.02368017194684777, 0.005611434819368834, -0.0018232088709110323, -0.000720549445520347]),
    ("coif3", 16, 16, &[-0.003793512864380802, 0.007782596425672746, 0.023452696142077168, -0.06577191128146936, -0.06112339000297255, 0.40517690240911824, 0.7937772226260872, 0.42848347637737, -0.07179982161915484, -0.08230192710629983, 0.03455502757329774, 0.015880544863669452, -0.009007976136730624, -0.0025745176881367972, 0.0011175187708306303, 0.0004662169598204029, -7.0983302506379e-05, -3.459977319727278e-05]),
    ("coif4", 22, 22, &[0.000892313902537003, -0.001629492425226786, -0.007346167936268051, 0.016066782559655206, 0.026792362270697267, -0.07314290441258073, -0.04877076756791383, 0.42747788393337943, 0.7842491699914577, 0.4354613422154989, -0.0615536584279808, -0.09176542029839818, 0.02811565972369683, 0.024945239305530328, -0.010417174666056649, -0.0032702731315608483, 0.0020166775120449105, 0.0006600112966963782, -0.00017960623150243602, -0.0001598819866911797, 4.3110389559021745e-05, 1.791447688858775e-05, -2.2414246658720156e-06, -1.5895026298510706e-06]),
    ("coif5", 28, 28, &[-0.00020435275475840417, 0.0003594435182401983, 0.0021236103520288515, -0.004159358882586693, -0.01015089565319003, 0.0235896855805574, 0.02748274935347108, -0.09183188210732418, -0.05126494901986978, 0.4214959750180438, 0.7884122236442312, 0.43461108487233163, -0.0665925373261814, -0.09742591124985338, 0.029270463596766775, 0.030604527112076528, -0.011467769117258803, -0.007054342992912432, 0.003462972633345625, 0.0019933487097862947, -0.000797305587514437, -0.00040432429065780583, 0.00018016568151754526, 7.659753172798574e-05, -2.4563022029455884e-05, -1.96951327170571e-05, 5.065805633959881e-06, 2.706837137999904e-06, -4.4211835056308547e-07, -4.812658626382732e-07, 8.45926907081045e-08, 6.647005671560187e-08, -8.709597862071148e-09, -1.3047018274756225e-08, 1.4544989552963826e-09, 1.6528397213573472e-09, -1.3390659555237858e-10, -2.2953015830108713e-10, 2.132161260573381e-11, 2.2303548538959977e-11, -1.5342809565877744e-12, -2.7841053597426e-12, 1.3964741573263992e-13, 2.782249961319575e-13, -1.1343520326364662e-14, -2.974148934954628e-14, 1.0237332141210804e-15, 2.7481118365347826e-15]),
];

#[derive(Debug)]
struct WaveFt {
    scaling: f32,
    seed: u64,
    /// `None`: `use_idwt: false`.
    wavelet: Option<&'static (&'static str, usize, usize, &'static [f64])>,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let scaling = match v.get("scaling") {
        None | Some(Value::Null) => 25.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("scaling is {x}, not a number")))?,
    };
    let seed = match v.get("random_loc_seed") {
        None => 777,
        Some(x) => x.as_u64().ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "random_loc_seed is {x}; PEFT seeds the coefficients' positions with a \
                     non-negative integer, and without it they cannot be known"
                ),
            )
        })?,
    };
    let use_idwt = v.get("use_idwt").and_then(Value::as_bool).unwrap_or(true);
    let wavelet = if use_idwt {
        let family = match v.get("wavelet_family") {
            None | Some(Value::Null) => "db1",
            Some(Value::String(s)) => s.as_str(),
            Some(x) => {
                return Err(Error::format(
                    path,
                    format!("wavelet_family is {x}, not a name"),
                ));
            }
        };
        Some(WAVELETS.iter().find(|w| w.0 == family).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "wavelet_family '{family}' has no entry in PEFT 0.21.2's wavelet and padding \
                     tables (PEFT cannot merge it either); known: {}",
                    WAVELETS.iter().map(|w| w.0).collect::<Vec<_>>().join(", ")
                ),
            )
        })?)
    } else {
        None
    };
    Ok(Box::new(WaveFt {
        // torch multiplies the f32 result by the Python float in f32.
        scaling: scaling as f32,
        seed,
        wavelet,
    }))
}

impl Tuner for WaveFt {
    fn name(&self) -> &'static str {
        "WaveFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["waveft_spectrum"])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        // Symmetric in out and in: the plan's evidence settles the orientation.
        m.parts
            .get("waveft_spectrum")
            .is_some_and(|s| s.shape.len() == 1 && s.numel() <= out_in[0] * out_in[1])
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let (s, out, inp) = spectrum_part(
            weights,
            m,
            base,
            "waveft_spectrum",
            "WaveFT",
            "coefficients'",
        )?;
        let w = &base.weight;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Coefficients {
                spectrum: s.clone(),
                out,
                inp,
                transposed: w.transposed,
                seed: self.seed,
                scaling: self.scaling,
                wavelet: self.wavelet.map(|w| (w.1, w.2, w.3)),
            }),
        }])
    }
}

#[derive(Debug)]
struct Coefficients {
    spectrum: TensorEntry,
    out: usize,
    inp: usize,
    transposed: bool,
    seed: u64,
    scaling: f32,
    /// (padding rows, padding cols, rec_lo), or `None` without the IDWT.
    wavelet: Option<(usize, usize, &'static [f64])>,
}

/// One coefficient in stored orientation: `(stored-col coefficient index, filter of the
/// stored rows, filter of the stored cols, value)`, bucketed by its stored-row index.
type Nz = (usize, usize, usize, f32);

struct Prepared {
    /// IDWT: per stored-row coefficient index, its coefficients.
    by_row: Vec<Vec<Nz>>,
    /// The two filters (rec_lo, rec_hi) in f32, and their f32 outer products
    /// `prod[f_r][f_c][i][j]`.
    prod: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// Offset of stored row / col 0 in the reconstructed (uncropped) image.
    off_r: usize,
    off_c: usize,
    /// Without the IDWT: per stored row, (col, value · scaling).
    sparse: Vec<Vec<(usize, f32)>>,
    idwt: bool,
    cols: usize,
    scaling: f32,
}

impl TensorChange for Coefficients {
    fn tuner(&self) -> &'static str {
        "WaveFT"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.spectrum]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (rows, cols) = if self.transposed {
            (self.inp, self.out)
        } else {
            (self.out, self.inp)
        };
        if (base.rows, base.cols) != (rows, cols) {
            return Err(Error::Internal(format!(
                "WaveFT coefficients for [{}, {}] on '{}' ({} x {})",
                self.out, self.inp, base.base.name, base.rows, base.cols
            )));
        }
        let values = decode(&self.spectrum);
        let idx = torch_randperm_prefix(self.out * self.inp, values.len(), self.seed);
        let at = |i: usize| (i / self.inp, i % self.inp);
        let Some((pr, pc, lo)) = self.wavelet else {
            let mut sparse = vec![Vec::new(); rows];
            for (&i, &v) in idx.iter().zip(&values) {
                let (p, q) = at(i);
                let (r, c) = if self.transposed { (q, p) } else { (p, q) };
                sparse[r].push((c, v * self.scaling));
            }
            return Ok(Box::new(Prepared {
                by_row: Vec::new(),
                prod: Vec::new(),
                len: 0,
                off_r: 0,
                off_c: 0,
                sparse,
                idwt: false,
                cols,
                scaling: self.scaling,
            }));
        };
        let len = lo.len();
        // PEFT's padded size (made even) and the coefficients' offset in it.
        let even = |x: usize| x + x % 2;
        let (h, w) = (even(self.out + pr), even(self.inp + pc));
        let (ro, co) = ((h - self.out) / 2, (w - self.inp) / 2);
        let (h2, w2) = (h / 2, w / 2);
        // Reconstructed size, PEFT's crop of (2L − 3) // 2 per side, then the centre.
        let pad = (2 * len - 3) / 2;
        let (hc, wc) = ((h - 2 + len) - 2 * pad, (w - 2 + len) - 2 * pad);
        if hc < self.out || wc < self.inp {
            return Err(Error::Internal(format!(
                "WaveFT reconstruction [{hc}, {wc}] smaller than '{}'",
                base.base.name
            )));
        }
        let (sr, sc) = ((hc - self.out) / 2, (wc - self.inp) / 2);
        let (off_out, off_in) = (pad + sr, pad + sc);
        // Channels: cA (lo, lo), cH (hi, lo), cV (lo, hi), cD (hi, hi) as (row filter, col filter).
        let lo32: Vec<f32> = lo.iter().map(|&x| x as f32).collect();
        let hi32: Vec<f32> = (0..len)
            .map(|i| {
                let x = lo[len - 1 - i] as f32;
                if i % 2 == 0 { x } else { -x }
            })
            .collect();
        let filt = [&lo32, &hi32];
        let prod: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|a| {
                (0..2)
                    .map(|b| {
                        let mut v = Vec::with_capacity(len * len);
                        for i in 0..len {
                            for j in 0..len {
                                v.push(filt[a][i] * filt[b][j]);
                            }
                        }
                        v
                    })
                    .collect()
            })
            .collect();
        let n_rows_coef = if self.transposed { w2 } else { h2 };
        let mut by_row: Vec<Vec<Nz>> = vec![Vec::new(); n_rows_coef];
        for (&i, &v) in idx.iter().zip(&values) {
            let (p, q) = at(i);
            let (pp, qq) = (p + ro, q + co);
            // Quadrant and index within it. The filters are crossed: cH (top right) uses
            // outer(hi, lo) — hi along rows — and cV (bottom left) outer(lo, hi).
            let (bottom, a) = if pp >= h2 { (1, pp - h2) } else { (0, pp) };
            let (right, b) = if qq >= w2 { (1, qq - w2) } else { (0, qq) };
            let (fo, fi) = (right, bottom);
            if self.transposed {
                by_row[b].push((a, fi, fo, v));
            } else {
                by_row[a].push((b, fo, fi, v));
            }
        }
        let (off_r, off_c) = if self.transposed {
            (off_in, off_out)
        } else {
            (off_out, off_in)
        };
        Ok(Box::new(Prepared {
            by_row,
            prod,
            len,
            off_r,
            off_c,
            sparse: Vec::new(),
            idwt: true,
            cols,
            scaling: self.scaling,
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        if !self.idwt {
            for (i, row) in band.chunks_mut(self.cols).enumerate() {
                for &(c, d) in &self.sparse[row0 + i] {
                    row[c] += d;
                }
            }
            return;
        }
        let l = self.len;
        let mut acc = vec![0f64; self.cols];
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            // Row y of the reconstructed image; coefficient rows a with 0 <= y − 2a < L.
            let y = row0 + i + self.off_r;
            acc.iter_mut().for_each(|a| *a = 0.0);
            let a_lo = (y + 2).saturating_sub(l) / 2;
            for a in a_lo..=(y / 2).min(self.by_row.len().saturating_sub(1)) {
                if y < 2 * a || y - 2 * a >= l {
                    continue;
                }
                let di = y - 2 * a;
                for &(b, fr, fc, v) in &self.by_row[a] {
                    let p = &self.prod[fr][fc][di * l..(di + 1) * l];
                    for (dj, &f) in p.iter().enumerate() {
                        // Column x = 2b + dj of the image is stored column x − off_c.
                        let x = 2 * b + dj;
                        if x >= self.off_c && x - self.off_c < self.cols {
                            acc[x - self.off_c] += v as f64 * f as f64;
                        }
                    }
                }
            }
            for (w, &a) in row.iter_mut().zip(&acc) {
                *w += (a as f32) * self.scaling;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

    fn entry(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        TensorEntry::in_memory(
            Path::new("t"),
            name,
            Dtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(v),
        )
        .unwrap()
    }

    fn run(t: &WaveFt, shape: [usize; 2], transposed: bool, s: &[f32]) -> Vec<f32> {
        let stored = if transposed {
            [shape[1], shape[0]]
        } else {
            shape
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &stored, &vec![0.0; shape[0] * shape[1]]),
                transposed,
            },
            bias: None,
        };
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(
                "waveft_spectrum".to_string(),
                entry("lin0.waveft_spectrum", &[s.len()], s),
            )]
            .into(),
        };
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap()
    }

    #[test]
    fn haar_of_all_approximation_ones_is_flat() {
        // db1 on a 2 x 2 weight, every coefficient 1 (cA = cH = cV = cD = 1): the Haar
        // synthesis of that is 2 at (0, 0) and 0 elsewhere (f32 filter products ≈ 0.5).
        let t = WaveFt {
            scaling: 1.0,
            seed: 777,
            wavelet: WAVELETS.iter().find(|w| w.0 == "db1"),
        };
        for transposed in [false, true] {
            let got = run(&t, [2, 2], transposed, &[1.0; 4]);
            assert!(
                (got[0] - 2.0).abs() < 1e-6 && got[1..].iter().all(|x| x.abs() < 1e-6),
                "{got:?}"
            );
        }
        // Without the IDWT the coefficients land as they are, times scaling.
        let t = WaveFt {
            scaling: 2.0,
            seed: 777,
            wavelet: None,
        };
        let mut got = run(&t, [2, 3], false, &[1.0; 6]);
        got.sort_by(f32::total_cmp);
        assert_eq!(got, [2.0; 6]);
    }
}
