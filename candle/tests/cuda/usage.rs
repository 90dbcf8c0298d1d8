//! The ops on candle's CUDA backend as a model uses them, on the first GPU (a module of `cuda`,
//! so that the GPU run's `cuda::` filter takes it); without one each test says loudly that it
//! SKIPPED (and fails instead when `CCPL_REQUIRE_GPU=1`):
//!
//! - inputs that are views (narrowed, permuted, at an offset in their storage), against the
//!   CPU path;
//! - a device with a stream of its own (`Device::new_cuda_with_stream`): the same bits as on
//!   candle's default stream, and the CPU path's values;
//! - backward twice on one graph: the second gives the bits of the first (the forward's
//!   workspace is read again, not used up);
//! - the rows loss on the small-S path with the content side tracked, in every storage type,
//!   against the CPU path;
//! - a candle-nn head between `neighbor_diff` and `rows_loss`, against the CPU path.
//!
//! Tolerances are those of the suite's `cuda` module: float32 results within the contract's
//! 1e-5 of the CPU path; a 16-bit result of the small-S path, which computes in float and
//! rounds once what it stores, within twice the error of the exact result rounded once (the
//! CPU path in that type) plus float32's share (the rule of ccpl's `kernel_small_s` tests).
//! A NaN anywhere fails the comparison.

use super::{
    F32_TOLERANCE, Graph, TAU, assert_each_close, gpu, gpu_made_by, grads, graph_on, loss_and_grads,
};
use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;
use ccpl::launch::small_s;
use ccpl_candle::{Centers, ccp_layer_loss, neighbor_diff, rows_loss};
use common::{Rng, TensorRng, assert_same, rel_err};

/// `(B, S, C)` of the rows cases on the small-S path: odd sizes, `S` at most 512.
const SMALL_ROWS: [usize; 3] = [3, 203, 45];
/// `(B, S, C)` of the rows cases on the fused path (`S` above 512).
const FUSED_ROWS: [usize; 3] = [2, 600, 129];

/// A graph of the ops and its inputs (on the CPU, every one tracked where it runs), with the
/// names of its results: the loss, then each input's gradient.
struct Case {
    what: String,
    names: Vec<&'static str>,
    inputs: Vec<Tensor>,
    graph: Box<Graph<'static>>,
}

impl Case {
    /// The loss and the gradients on `dev`.
    fn on(&self, dev: &Device) -> Result<Vec<Vec<f64>>> {
        loss_and_grads(&self.graph, &self.inputs, dev)
    }

    /// Asserts that the case gives on `dev` the CPU path's values at float32's tolerance.
    fn assert_matches_the_cpu(&self, dev: &Device) -> Result<()> {
        let want = self.on(&Device::Cpu)?;
        let got = self.on(dev)?;
        assert_each_close(&self.what, &self.names, &got, &want, |_| F32_TOLERANCE);
        Ok(())
    }
}

/// `dims` uniform in `[-scale, scale)` stored in f32, on the CPU.
fn f32_input(rng: &mut Rng, dims: &[usize], scale: f64) -> Result<Tensor> {
    Ok(rng.tensor(dims, scale, DType::F32, &Device::Cpu)?.0)
}

/// The layer loss of two `(2, 37, 13, 11)` maps at 40 centres, both sides tracked.
fn layer_case(rng: &mut Rng) -> Result<Case> {
    let centers = Centers::sample(13, 11, 40, rng.next_u64()).unwrap();
    Ok(Case {
        what: "layer".into(),
        names: vec!["loss", "grad feat_q", "grad feat_k"],
        inputs: vec![
            f32_input(rng, &[2, 37, 13, 11], 1.0)?,
            f32_input(rng, &[2, 37, 13, 11], 1.0)?,
        ],
        graph: Box::new(move |t: &[Tensor]| ccp_layer_loss(&t[0], &t[1], &centers, TAU)),
    })
}

/// The rows loss of `dims` in `dtype`, both sides tracked (the content side's gradient too).
fn rows_case(rng: &mut Rng, dtype: DType, dims: [usize; 3]) -> Result<Case> {
    let cpu = &Device::Cpu;
    Ok(Case {
        what: format!("rows {dims:?} {dtype:?}"),
        names: vec!["loss", "grad q", "grad k"],
        inputs: vec![
            rng.tensor(&dims, 3.0, dtype, cpu)?.0,
            rng.tensor(&dims, 0.5, dtype, cpu)?.0,
        ],
        graph: Box::new(|t: &[Tensor]| rows_loss(&t[0], &t[1], TAU)),
    })
}

/// The paper's use with a learned head: `neighbor_diff` of both maps `(2, 37, 13, 11)` at 23
/// centres (`S = 184`, the small-S path), one candle-nn `Linear(37, 29)` for both sides
/// (its weight and bias tracked), `rows_loss` with both sides tracked.
fn head_case(rng: &mut Rng) -> Result<Case> {
    let centers = Centers::sample(13, 11, 23, rng.next_u64()).unwrap();
    Ok(Case {
        what: "neighbor_diff -> Linear -> rows_loss".into(),
        names: vec![
            "loss",
            "grad feat_q",
            "grad feat_k",
            "grad weight",
            "grad bias",
        ],
        inputs: vec![
            f32_input(rng, &[2, 37, 13, 11], 1.0)?,
            f32_input(rng, &[2, 37, 13, 11], 1.0)?,
            f32_input(rng, &[29, 37], 0.3)?,
            f32_input(rng, &[29], 0.3)?,
        ],
        graph: Box::new(move |t: &[Tensor]| {
            let head = Linear::new(t[2].clone(), Some(t[3].clone()));
            let q = head.forward(&neighbor_diff(&t[0], &centers)?)?;
            let k = head.forward(&neighbor_diff(&t[1], &centers)?)?;
            rows_loss(&q, &k, TAU)
        }),
    })
}

/// Each op on views of its inputs (the gradients are the underlying tensors'): the layer loss
/// of a map narrowed in its channels and of one permuted from `(B, H, W, C)`; the rows loss of
/// rows at an offset in their storage (narrowed in the batch, still contiguous) and of rows
/// transposed from `(B, C, S)`; the difference rows of a map both permuted and narrowed in its
/// width, summed as squares in f64 (an exact-enough scalar on both paths).
fn view_cases(rng: &mut Rng) -> Result<Vec<Case>> {
    let layer_centers = Centers::sample(13, 11, 40, rng.next_u64()).unwrap();
    let diff_centers = Centers::sample(13, 11, 23, rng.next_u64()).unwrap();
    Ok(vec![
        Case {
            what: "layer of views".into(),
            names: vec!["loss", "grad (2, 41, 13, 11)", "grad (2, 13, 11, 37)"],
            inputs: vec![
                f32_input(rng, &[2, 41, 13, 11], 1.0)?,
                f32_input(rng, &[2, 13, 11, 37], 1.0)?,
            ],
            graph: Box::new(move |t: &[Tensor]| {
                let q = t[0].narrow(1, 3, 37)?;
                let k = t[1].permute((0, 3, 1, 2))?;
                ccp_layer_loss(&q, &k, &layer_centers, TAU)
            }),
        },
        Case {
            what: "rows of views".into(),
            names: vec!["loss", "grad (4, 203, 45)", "grad (3, 45, 203)"],
            inputs: vec![
                f32_input(rng, &[4, 203, 45], 3.0)?,
                f32_input(rng, &[3, 45, 203], 0.5)?,
            ],
            graph: Box::new(|t: &[Tensor]| {
                let q = t[0].narrow(0, 1, 3)?;
                let k = t[1].transpose(1, 2)?;
                rows_loss(&q, &k, TAU)
            }),
        },
        Case {
            what: "neighbor_diff of a view".into(),
            names: vec!["sum of squares", "grad (3, 13, 14, 37)"],
            inputs: vec![f32_input(rng, &[3, 13, 14, 37], 1.0)?],
            graph: Box::new(move |t: &[Tensor]| {
                let feat = t[0].permute((0, 3, 1, 2))?.narrow(3, 2, 11)?;
                let rows = neighbor_diff(&feat, &diff_centers)?;
                rows.to_dtype(DType::F64)?.sqr()?.sum_all()
            }),
        },
    ])
}

#[test]
fn views_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu("views_match_the_cpu") else {
        return Ok(());
    };
    for case in view_cases(&mut Rng::new(41))? {
        case.assert_matches_the_cpu(&dev)?;
    }
    Ok(())
}

#[test]
fn a_device_with_its_own_stream_runs_the_ops() -> Result<()> {
    let test = "a_device_with_its_own_stream_runs_the_ops";
    let Some(own) = gpu_made_by(test, Device::new_cuda_with_stream) else {
        return Ok(());
    };
    let default = Device::new_cuda(0)?;
    let mut rng = Rng::new(42);
    let cases = [
        layer_case(&mut rng)?,
        rows_case(&mut rng, DType::F32, SMALL_ROWS)?,
        rows_case(&mut rng, DType::F32, FUSED_ROWS)?,
    ];
    for case in &cases {
        let got = case.on(&own)?;
        let want = case.on(&default)?;
        for (name, (got, want)) in case.names.iter().zip(got.iter().zip(&want)) {
            let what = format!("{} {name} on its own stream", case.what);
            assert_same(&what, got, want);
        }
        case.assert_matches_the_cpu(&own)?;
    }
    // cuBLAS's matmul: the CPU path's values, not the bits of another stream's handle.
    head_case(&mut rng)?.assert_matches_the_cpu(&own)
}

#[test]
fn backward_twice_gives_the_same_gradients() -> Result<()> {
    let Some(dev) = gpu("backward_twice_gives_the_same_gradients") else {
        return Ok(());
    };
    let mut rng = Rng::new(43);
    let mut cases = vec![
        layer_case(&mut rng)?,
        rows_case(&mut rng, DType::F32, SMALL_ROWS)?,
        rows_case(&mut rng, DType::BF16, SMALL_ROWS)?,
        rows_case(&mut rng, DType::F32, FUSED_ROWS)?,
        head_case(&mut rng)?,
    ];
    cases.extend(view_cases(&mut rng)?);
    for case in &cases {
        let (loss, vars) = graph_on(&case.graph, &case.inputs, &dev)?;
        let vars: Vec<&Tensor> = vars.iter().collect();
        let first = grads(&loss, &vars)?;
        let second = grads(&loss, &vars)?;
        for (name, (second, first)) in case.names[1..].iter().zip(second.iter().zip(&first)) {
            let what = format!("{} {name} of the second backward", case.what);
            assert_same(&what, second, first);
        }
    }
    Ok(())
}

#[test]
fn small_s_rows_with_the_content_side_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu("small_s_rows_with_the_content_side_match_the_cpu") else {
        return Ok(());
    };
    assert!(small_s::takes(SMALL_ROWS[1]), "{SMALL_ROWS:?} is small-S");
    let mut rng = Rng::new(44);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let case = rows_case(&mut rng, dtype, SMALL_ROWS)?;
        let got = case.on(&dev)?;
        // The exact result from the stored inputs, and that result rounded once to `dtype`.
        let exact_inputs = case
            .inputs
            .iter()
            .map(|t| t.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?;
        let exact = loss_and_grads(&case.graph, &exact_inputs, &Device::Cpu)?;
        let rounded = case.on(&Device::Cpu)?;
        let tolerance = |i: usize| 2.0 * rel_err(&rounded[i], &exact[i]) + F32_TOLERANCE;
        assert_each_close(&case.what, &case.names, &got, &exact, tolerance);
    }
    Ok(())
}

/// The head's gradients carry the rows' gradient through its matmuls, float32 on both paths
/// (candle's cuBLAS without TF32 by default); float32's rounding there costs about 3e-7 of the
/// weight's gradient against float64 (measured on the CPU), and the small-S path computes the
/// rows' gradient in float without tensor cores, so the contract's 1e-5 holds with margin.
#[test]
fn a_head_between_the_ops_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("a_head_between_the_ops_matches_the_cpu") else {
        return Ok(());
    };
    head_case(&mut Rng::new(45))?.assert_matches_the_cpu(&dev)
}
