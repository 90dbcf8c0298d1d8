//! The float64 CPU reference, stage by stage and end to end, at small sizes: what the oracle
//! costs when the tests call it (it is written to read like the spec, not to be fast).
//!
//! `cargo bench --bench reference`

use std::hint::black_box;

use ccpl::reference::{
    ccp_layer_loss, info_nce_backward, info_nce_forward, neighbor_diff, neighbor_diff_backward,
    normalize_rows, normalize_rows_backward, similarity,
};
use ccpl::{Centers, FeatureShape, Layout, RowShape, Tau};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

mod common;

/// A small layer: its name, `(B, C, H, W)` and `num_s`.
struct Size {
    name: &'static str,
    dims: (usize, usize, usize, usize),
    num_s: usize,
}

const SIZES: &[Size] = &[
    Size {
        name: "B2-C32-16x16-S64",
        dims: (2, 32, 16, 16),
        num_s: 8,
    },
    Size {
        name: "B2-C64-32x32-S256",
        dims: (2, 64, 32, 32),
        num_s: 32,
    },
];

/// Everything every stage reads, computed once per size (outside the timed region).
struct Inputs {
    shape: FeatureShape,
    rows: RowShape,
    centers: Centers,
    feat_q: Vec<f32>,
    feat_k: Vec<f32>,
    diff: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    logits: Vec<f64>,
    row_lse: Vec<f64>,
    grad_rows: Vec<f64>,
}

impl Inputs {
    fn new(size: &Size) -> Self {
        let (b, c, h, w) = size.dims;
        let shape = FeatureShape::new(b, c, h, w, Layout::Nchw).expect("valid size");
        let centers = Centers::sample(h, w, size.num_s, 1).expect("valid centres");
        let rows = RowShape::new(b, centers.rows(), c).expect("valid rows");
        let mut rng = common::Rng::new(2022);
        let feat_q: Vec<f32> = rng.vec(shape.len()).into_iter().map(|x| x as f32).collect();
        let feat_k: Vec<f32> = rng.vec(shape.len()).into_iter().map(|x| x as f32).collect();
        let diff = neighbor_diff(&feat_q, &shape, &centers).expect("diff");
        let q = normalize_rows(&diff, c).expect("normalize").rows;
        let k = normalize_rows(&neighbor_diff(&feat_k, &shape, &centers).expect("diff"), c)
            .expect("normalize")
            .rows;
        let logits = similarity(&q, &k, &rows, Tau::DEFAULT).expect("similarity");
        let row_lse = info_nce_forward(&logits, b, rows.rows())
            .expect("info_nce")
            .row_lse;
        let grad_rows = rng.vec(rows.len());
        Self {
            shape,
            rows,
            centers,
            feat_q,
            feat_k,
            diff,
            q,
            k,
            logits,
            row_lse,
            grad_rows,
        }
    }
}

fn stages(c: &mut Criterion) {
    for size in SIZES {
        let x = Inputs::new(size);
        let width = x.rows.width();
        let mut group = c.benchmark_group("reference");
        group.bench_function(BenchmarkId::new("neighbor_diff", size.name), |b| {
            b.iter(|| neighbor_diff(black_box(&x.feat_q), &x.shape, &x.centers))
        });
        group.bench_function(BenchmarkId::new("neighbor_diff_backward", size.name), |b| {
            let mut grad_feat = vec![0.0; x.shape.len()];
            b.iter(|| {
                neighbor_diff_backward(
                    black_box(&x.grad_rows),
                    &x.shape,
                    &x.centers,
                    &mut grad_feat,
                )
            })
        });
        group.bench_function(BenchmarkId::new("normalize_rows", size.name), |b| {
            b.iter(|| normalize_rows(black_box(&x.diff), width))
        });
        group.bench_function(
            BenchmarkId::new("normalize_rows_backward", size.name),
            |b| b.iter(|| normalize_rows_backward(black_box(&x.diff), &x.grad_rows, width)),
        );
        group.bench_function(BenchmarkId::new("similarity", size.name), |b| {
            b.iter(|| similarity(black_box(&x.q), &x.k, &x.rows, Tau::DEFAULT))
        });
        group.bench_function(BenchmarkId::new("info_nce_forward", size.name), |b| {
            b.iter(|| info_nce_forward(black_box(&x.logits), x.rows.batch(), x.rows.rows()))
        });
        group.bench_function(BenchmarkId::new("info_nce_backward", size.name), |b| {
            b.iter(|| {
                info_nce_backward(
                    black_box(&x.logits),
                    &x.row_lse,
                    &x.q,
                    &x.k,
                    &x.rows,
                    Tau::DEFAULT,
                    1.0,
                    false,
                )
            })
        });
        group.bench_function(BenchmarkId::new("layer_loss", size.name), |b| {
            b.iter(|| {
                ccp_layer_loss(
                    black_box(&x.feat_q),
                    &x.feat_k,
                    &x.shape,
                    &x.centers,
                    Tau::DEFAULT,
                    false,
                )
            })
        });
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
