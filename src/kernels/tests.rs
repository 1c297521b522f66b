//! Every kernel against an f64 product of the values the packed matrix holds, on every
//! instruction set this CPU runs, over shapes with ragged row groups and column tiles.

use super::isa::Isa;
use super::packed_matrix::{q4_1_blocks, Format, Input, PackedMatrix};
use super::quantize::QuantizedRows;
use super::team::Team;
use rand::{Rng, SeedableRng};

fn random(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// x W^T in f64 from what the kernels see: W as packed, x as quantised (for 8-bit formats).
fn reference(m: &PackedMatrix, x: &[f32], q: &QuantizedRows, columns: usize) -> Vec<f64> {
    let mut out = vec![0.0; columns * m.rows];
    for c in 0..columns {
        for r in 0..m.rows {
            out[c * m.rows + r] = (0..m.cols)
                .map(|k| {
                    let xv = match m.format {
                        Format::F32 => x[c * m.cols + k] as f64,
                        _ => {
                            let b = k / 32;
                            q.values[c * m.cols + k] as f64
                                * q.scales[c * q.blocks_per_row() + b] as f64
                        }
                    };
                    m.get(r, k) as f64 * xv
                })
                .sum();
        }
    }
    out
}

#[test]
fn products_match_the_f64_reference_on_every_instruction_set() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let teams = [Team::single(), Team::new(3)];
    for &(rows, cols, columns) in &[
        (1, 32, 1),
        (16, 64, 4),
        (37, 96, 5),
        (50, 128, 9),
        (200, 576, 3),
    ] {
        let w = random(&mut rng, rows * cols, 0.5);
        let x = random(&mut rng, columns * cols, 2.0);
        let mut q = QuantizedRows::default();
        q.quantize_from(&x, cols);
        let q8_0: Vec<u8> = {
            let m = PackedMatrix::quantize_f32(&w, rows, cols);
            (0..rows)
                .flat_map(|r| {
                    (0..cols / 32).flat_map({
                        let m = &m;
                        move |b| {
                            let values: Vec<f32> = (0..32).map(|e| m.get(r, b * 32 + e)).collect();
                            let scale = values.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                            let scale = half::f16::from_f32(scale);
                            let mut block = scale.to_le_bytes().to_vec();
                            block.extend(values.iter().map(|v| {
                                let s = scale.to_f32();
                                (if s > 0.0 { (v / s).round() } else { 0.0 }) as i8 as u8
                            }));
                            block
                        }
                    })
                })
                .collect()
        };
        let matrices = [
            PackedMatrix::from_f32(&w, rows, cols),
            PackedMatrix::quantize_f32(&w, rows, cols),
            PackedMatrix::from_q8_0(&q8_0, rows, cols),
            PackedMatrix::from_q4_1(&q4_1_blocks(&w, cols), rows, cols),
        ];
        for m in &matrices {
            // The packed values stay within one quantisation step of the source.
            let step = match m.format {
                Format::F32 => 0.0,
                Format::Q8 => 0.5 / 127.0 * 1.01,
                Format::Q4 => 1.0 / 15.0 * 1.01,
            };
            for (i, &v) in w.iter().enumerate() {
                assert!(
                    (m.get(i / cols, i % cols) - v).abs() <= step + 1e-3,
                    "{:?} value {i}",
                    m.format
                );
            }
            let expected = reference(m, &x, &q, columns);
            for isa in Isa::usable() {
                for team in &teams {
                    let input = match m.format {
                        Format::F32 => Input::F32 { values: &x, cols },
                        _ => Input::Int8(&q),
                    };
                    let mut out = vec![f32::NAN; columns * rows];
                    m.product(team, isa, input, &mut out, rows);
                    for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                        let tolerance = 1e-4 * (1.0 + want.abs()) + 1e-5 * cols as f64;
                        assert!(
                            (got as f64 - want).abs() <= tolerance,
                            "{:?} {isa:?} {rows}x{cols} x{columns}: output {i} is {got}, want {want}",
                            m.format
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn outputs_do_not_depend_on_threads_or_batch() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, cols) = (90, 256);
    let w = random(&mut rng, rows * cols, 0.5);
    let x = random(&mut rng, 7 * cols, 1.0);
    let m = PackedMatrix::from_q4_1(&q4_1_blocks(&w, cols), rows, cols);
    let isa = Isa::best();
    let mut all = QuantizedRows::default();
    all.quantize_from(&x, cols);
    let mut batched = vec![0.0; 7 * rows];
    m.product(&Team::new(2), isa, Input::Int8(&all), &mut batched, rows);
    for c in 0..7 {
        let mut one = QuantizedRows::default();
        one.quantize_from(&x[c * cols..(c + 1) * cols], cols);
        let mut out = vec![0.0; rows];
        m.product(&Team::single(), isa, Input::Int8(&one), &mut out, rows);
        assert_eq!(out, batched[c * rows..(c + 1) * rows], "column {c}");
    }
}

#[test]
fn the_best_instruction_set_passes_its_probe() {
    let best = Isa::best();
    assert!(Isa::usable().contains(&best));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert_ne!(
            best,
            Isa::Portable,
            "an x86-64 CPU with AVX2 should not fall back to portable kernels"
        );
    }
}

/// Every GGUF block type the packer reads gives back the values candle's own dequantisation
/// of the same blocks gives (to the f16 rounding of Q4_K's combined scales).
#[test]
fn gguf_blocks_repack_to_the_values_candle_dequantises() {
    use super::packed_matrix::FourBit;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (rows, cols) = (20, 512);
    let w = random(&mut rng, rows * cols, 1.0);
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    for kind in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q8_0,
    ] {
        let q = QTensor::quantize(&t, kind).unwrap();
        let raw = q.data().unwrap();
        let want = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let m = match kind {
            GgmlDType::Q4_0 => PackedMatrix::from_four_bit(&[FourBit::Q4_0(&raw)], cols),
            GgmlDType::Q4_1 => PackedMatrix::from_four_bit(&[FourBit::Q4_1(&raw)], cols),
            GgmlDType::Q4K => PackedMatrix::from_four_bit(&[FourBit::Q4K(&raw)], cols),
            _ => PackedMatrix::from_q8_0(&raw, rows, cols),
        };
        assert_eq!((m.rows, m.cols), (rows, cols));
        for (r, row) in want.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                let got = m.get(r, k);
                assert!(
                    (got - v).abs() <= 2e-3 * (1.0 + v.abs()),
                    "{kind:?} ({r}, {k}): {got} vs {v}"
                );
            }
        }
    }
}

/// The decode step's vector kernels against f64 definitions, on every instruction set, with
/// lengths that leave ragged tails after the 16-lane loops.
#[test]
fn vector_kernels_match_f64_definitions() {
    use super::vector;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for isa in Isa::usable() {
        for &(dim, rows, capacity) in &[(64, 1, 64), (64, 37, 64), (48, 130, 256), (17, 5, 9)] {
            let (stride, offset) = (3 * dim, dim);
            let q = random(&mut rng, dim, 1.0);
            let keys = random(&mut rng, dim * capacity, 1.0);
            let values = random(&mut rng, capacity * stride, 1.0);
            let scale = 1.0 / (dim as f32).sqrt();
            let scores: Vec<f64> = (0..rows)
                .map(|j| {
                    (0..dim)
                        .map(|d| q[d] as f64 * keys[d * capacity + j] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut out = vec![f32::NAN; dim];
            let mut scratch = Vec::new();
            vector::attend(
                isa,
                &q,
                &keys,
                capacity,
                &values,
                rows,
                stride,
                offset,
                scale,
                &mut scratch,
                &mut out,
            );
            for (i, &o) in out.iter().enumerate() {
                let want: f64 = (0..rows)
                    .map(|j| weights[j] * values[j * stride + offset + i] as f64)
                    .sum::<f64>()
                    / total;
                assert!(
                    (o as f64 - want).abs() < 1e-5,
                    "{isa:?} attend dim {dim} rows {rows}: {o} vs {want}"
                );
            }
        }
        let (gate, up) = (random(&mut rng, 77, 6.0), random(&mut rng, 77, 2.0));
        let mut out = vec![0.0; 77];
        vector::swiglu(isa, &gate, &up, &mut out);
        for ((&o, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!(
                (o as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{isa:?} swiglu {o} vs {want}"
            );
        }
        let (mut y, x) = (random(&mut rng, 45, 1.0), random(&mut rng, 45, 1.0));
        let before = y.clone();
        vector::axpy(isa, &mut y, 0.75, &x);
        for ((&y, &b), &x) in y.iter().zip(&before).zip(&x) {
            assert_eq!(y, b + 0.75 * x);
        }
    }
    let (x, w) = (random(&mut rng, 70, 3.0), random(&mut rng, 70, 1.0));
    let mut out = vec![0.0; 70];
    vector::rms_norm(&x, &w, 1e-5, &mut out);
    let rms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / 70.0 + 1e-5).sqrt();
    for ((&o, &x), &w) in out.iter().zip(&x).zip(&w) {
        assert!((o as f64 - x as f64 / rms * w as f64).abs() < 1e-5);
    }
    let mut head = random(&mut rng, 8, 1.0);
    let original = head.clone();
    let (cos, sin) = ([0.5f32, 1.0, 0.0, -0.6], [0.8660254f32, 0.0, 1.0, 0.8]);
    vector::rope(&mut head, &cos, &sin);
    for i in 0..4 {
        let (a, b) = (original[i] as f64, original[i + 4] as f64);
        assert!((head[i] as f64 - (a * cos[i] as f64 - b * sin[i] as f64)).abs() < 1e-6);
        assert!((head[i + 4] as f64 - (b * cos[i] as f64 + a * sin[i] as f64)).abs() < 1e-6);
    }
}
