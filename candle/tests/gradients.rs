//! The gradients candle's autograd gets through the ops, in f64 on the CPU:
//!
//! - against finite differences of the losses candle computes (the layer loss; the neighbour
//!   differences, a linear head and the rows loss), along random directions of every input;
//! - with the paper's projection heads (`Linear(C, C)`, ReLU, `Linear(C, C/4)` per layer, two
//!   layers summed), against the same loss written with plain candle ops here: the heads'
//!   parameter gradients and the features' gradient.
//!
//! Derivatives are taken with the 4-point central stencil
//! `f'(0) ~ (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h` (truncation O(h^4)). A wrong gradient
//! (a side swapped, a lost upstream factor, a missing scatter) gives an error of order 1, far
//! above the tolerances, which are about 100x the largest error measured on these (seeded)
//! cases.

use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap, linear};
use ccpl_candle::{Centers, ccp_layer_loss, neighbor_diff, rows_loss};
use common::{Rng, SPEC_DIRECTIONS, TensorRng, assert_close, values};

/// Finite differences through the layer loss (step 1e-4): measured 4.0e-11.
const TOL_FD_LAYER: f64 = 4e-9;
/// Finite differences through neighbour differences, a linear head and the rows loss (step
/// 1e-4): measured 6.6e-12.
const TOL_FD_HEAD: f64 = 7e-10;
/// The ops against plain candle ops, both in f64 (the same function, summed in other orders):
/// measured 1.4e-16 on the loss, at most 5.4e-16 on the gradients.
const TOL_PLAIN: f64 = 5e-14;

const TAU: f64 = 0.07;

/// Derivative at 0 of `f` by the 4-point central stencil with step `h`.
fn central_diff(f: impl Fn(f64) -> Result<f64>, h: f64) -> Result<f64> {
    Ok((8.0 * (f(h)? - f(-h)?) - (f(2.0 * h)? - f(-2.0 * h)?)) / (12.0 * h))
}

/// `x + t v`.
fn step(x: &Tensor, v: &Tensor, t: f64) -> Result<Tensor> {
    x + (v * t)?
}

/// For each of `directions` (one tensor per input), the derivative of `loss` at `inputs` along
/// it by finite differences, and by the gradients candle's autograd gives for `inputs`
/// (variables): `(finite differences, autograd)`.
fn directional(
    loss: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Var],
    directions: &[Vec<Tensor>],
    h: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&tensors)?.backward()?;
    let (mut fd, mut autograd) = (Vec::new(), Vec::new());
    for dir in directions {
        fd.push(central_diff(
            |t| {
                let moved = tensors
                    .iter()
                    .zip(dir)
                    .map(|(x, v)| step(x, v, t))
                    .collect::<Result<Vec<_>>>()?;
                loss(&moved)?.to_scalar::<f64>()
            },
            h,
        )?);
        let mut dot = 0.0;
        for (x, v) in inputs.iter().zip(dir) {
            let g = grads.get(x).expect("every input gets a gradient");
            dot += (g * v)?.sum_all()?.to_scalar::<f64>()?;
        }
        autograd.push(dot);
    }
    Ok((fd, autograd))
}

/// `count` random directions for tensors of the shapes of `inputs`.
fn directions(rng: &mut Rng, inputs: &[Var], count: usize) -> Result<Vec<Vec<Tensor>>> {
    (0..count)
        .map(|_| {
            inputs
                .iter()
                .map(|x| Ok(rng.tensor(x.dims(), 1.0, DType::F64, &Device::Cpu)?.0))
                .collect()
        })
        .collect()
}

/// A variable of `dims` with values uniform in `[-1, 1)`, f64 on the CPU.
fn var(rng: &mut Rng, dims: &[usize]) -> Result<Var> {
    Var::from_tensor(&rng.tensor(dims, 1.0, DType::F64, &Device::Cpu)?.0)
}

#[test]
fn layer_loss_gradient_is_the_derivative_of_its_loss() -> Result<()> {
    let mut rng = Rng::new(21);
    let (b, c, h, w) = (2, 5, 7, 9);
    let centers = Centers::sample(h, w, 13, rng.next_u64()).unwrap();
    let inputs = [var(&mut rng, &[b, c, h, w])?, var(&mut rng, &[b, c, h, w])?];
    let dirs = directions(&mut rng, &inputs, 6)?;
    let loss = |x: &[Tensor]| ccp_layer_loss(&x[0], &x[1], &centers, TAU);
    let (fd, autograd) = directional(loss, &inputs, &dirs, 1e-4)?;
    assert_close(
        "layer loss: autograd vs finite differences",
        &autograd,
        &fd,
        TOL_FD_LAYER,
    );
    Ok(())
}

/// An upstream gradient that float32 cannot hold (`1 + 2^-40`) reaches the float64 gradients
/// whole: each is the gradient at upstream 1 times it, to the bit, for both losses.
#[test]
fn float64_backward_keeps_a_float64_upstream_gradient() -> Result<()> {
    let mut rng = Rng::new(23);
    let (b, c, h, w) = (2, 3, 5, 6);
    let centers = Centers::sample(h, w, 4, rng.next_u64()).unwrap();
    let feats = [var(&mut rng, &[b, c, h, w])?, var(&mut rng, &[b, c, h, w])?];
    let rows = [var(&mut rng, &[b, 7, c])?, var(&mut rng, &[b, 7, c])?];
    upstream_is_kept("layer", &feats, |q, k| ccp_layer_loss(q, k, &centers, TAU))?;
    upstream_is_kept("rows", &rows, |q, k| rows_loss(q, k, TAU))
}

/// Asserts that `loss` times `1 + 2^-40` has exactly that times the gradients of `loss`.
fn upstream_is_kept(
    what: &str,
    [q, k]: &[Var; 2],
    loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let upstream = 1.0 + 2f64.powi(-40);
    let at_one = loss(q, k)?.backward()?;
    let scaled = (loss(q, k)? * upstream)?.backward()?;
    for x in [q, k] {
        let want = (at_one.get(x).unwrap() * upstream)?;
        let got = values(scaled.get(x).unwrap())?;
        assert_eq!(
            got,
            values(&want)?,
            "{what}: the upstream gradient was rounded"
        );
    }
    Ok(())
}

#[test]
fn head_gradients_are_the_derivatives_of_the_loss() -> Result<()> {
    let mut rng = Rng::new(22);
    let (b, c, h, w, out) = (2, 6, 6, 7, 3);
    let centers = Centers::sample(h, w, 9, rng.next_u64()).unwrap();
    // feat_q, feat_k, and a linear head's weight and bias, shared by both sides.
    let inputs = [
        var(&mut rng, &[b, c, h, w])?,
        var(&mut rng, &[b, c, h, w])?,
        var(&mut rng, &[out, c])?,
        var(&mut rng, &[out])?,
    ];
    let dirs = directions(&mut rng, &inputs, 6)?;
    let loss = |x: &[Tensor]| {
        let head = Linear::new(x[2].clone(), Some(x[3].clone()));
        let q = head.forward(&neighbor_diff(&x[0], &centers)?)?;
        let k = head.forward(&neighbor_diff(&x[1], &centers)?)?;
        rows_loss(&q, &k, TAU)
    };
    let (fd, autograd) = directional(loss, &inputs, &dirs, 1e-4)?;
    assert_close(
        "head: autograd vs finite differences",
        &autograd,
        &fd,
        TOL_FD_HEAD,
    );
    Ok(())
}

/// The contract's difference rows `(B, 8N, C)` with candle's own ops: row `k*N + x` is the
/// centre `x` minus its neighbour in direction `k`.
fn plain_neighbor_diff(feat: &Tensor, centers: &Centers) -> Result<Tensor> {
    let (b, c, h, w) = feat.dims4()?;
    let flat = feat.reshape((b, c, h * w))?;
    let (mut centre, mut neighbour) = (Vec::new(), Vec::new());
    for (dh, dw) in SPEC_DIRECTIONS {
        for &p in centers.flat() {
            centre.push(p as u32);
            neighbour.push((p as isize + dh * w as isize + dw) as u32);
        }
    }
    let take = |index: Vec<u32>| flat.index_select(&Tensor::new(index, feat.device())?, 2);
    // Contiguous: candle 0.11.1's CPU matmul is wrong for a transposed lhs times a batch-
    // broadcast rhs (huggingface/candle#3744, #3758), which candle-nn's Linear makes of a
    // non-contiguous `(B, S, C)` input.
    (take(centre)? - take(neighbour)?)?
        .transpose(1, 2)?
        .contiguous()
}

/// The contract's rows loss with candle's own ops: rows divided by their norm plus 1e-7,
/// logits `q k^T / tau`, the mean over rows of `logsumexp - diagonal`.
fn plain_rows_loss(q: &Tensor, k: &Tensor, tau: f64) -> Result<Tensor> {
    let unit = |x: &Tensor| x.broadcast_div(&(x.sqr()?.sum_keepdim(2)?.sqrt()? + 1e-7)?);
    let logits = (unit(q)?.matmul(&unit(k)?.transpose(1, 2)?)? / tau)?;
    let s = logits.dim(1)?;
    let eye = Tensor::eye(s, logits.dtype(), logits.device())?;
    let positives = logits.broadcast_mul(&eye)?.sum(2)?;
    (logits.log_sum_exp(2)? - positives)?.mean_all()
}

/// The paper's head of one layer: `Linear(C, C)`, ReLU, `Linear(C, C/4)`.
struct Head(Linear, Linear);

impl Head {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(
            linear(channels, channels, vb.pp("0"))?,
            linear(channels, channels / 4, vb.pp("2"))?,
        ))
    }
    fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        self.1.forward(&self.0.forward(rows)?.relu()?)
    }
}

#[test]
fn paper_heads_get_the_gradients_of_plain_candle_ops() -> Result<()> {
    let mut rng = Rng::new(23);
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F64, &dev);
    // Two layers of odd sizes, each with its head and its own centres; the loss is their sum.
    let layers = [(8, 7, 9, 5), (12, 6, 5, 11)]; // (C, H, W, num_s)
    let b = 2;
    let mut setup = Vec::new();
    for (i, &(c, h, w, num_s)) in layers.iter().enumerate() {
        let head = Head::new(c, vb.pp(format!("head{i}")))?;
        let feat_q = var(&mut rng, &[b, c, h, w])?;
        let feat_k = rng.tensor(&[b, c, h, w], 1.0, DType::F64, &dev)?.0;
        let centers = Centers::sample(h, w, num_s, rng.next_u64()).unwrap();
        setup.push((head, feat_q, feat_k, centers));
    }
    let total = |diff: &dyn Fn(&Tensor, &Centers) -> Result<Tensor>,
                 loss: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
        let mut sum = Tensor::new(0.0f64, &dev)?;
        for (head, feat_q, feat_k, centers) in &setup {
            let q = head.forward(&diff(feat_q, centers)?)?;
            let k = head.forward(&diff(feat_k, centers)?)?;
            sum = (sum + loss(&q, &k)?)?;
        }
        Ok::<_, candle_core::Error>(sum)
    };
    let ours = total(&neighbor_diff, &|q, k| rows_loss(q, k, TAU))?;
    let plain = total(&plain_neighbor_diff, &|q, k| plain_rows_loss(q, k, TAU))?;
    assert_close("loss", &values(&ours)?, &values(&plain)?, TOL_PLAIN);

    let (ours, plain) = (ours.backward()?, plain.backward()?);
    let mut checked = 0;
    for (name, v) in vars.data().lock().unwrap().iter() {
        let got = values(ours.get(v).expect("every head parameter gets a gradient"))?;
        let want = values(plain.get(v).unwrap())?;
        assert_close(&format!("grad {name}"), &got, &want, TOL_PLAIN);
        checked += 1;
    }
    assert_eq!(
        checked, 8,
        "two layers of two linear layers of a weight and a bias"
    );
    for (i, (_, feat_q, feat_k, _)) in setup.iter().enumerate() {
        let got = values(ours.get(feat_q).unwrap())?;
        let want = values(plain.get(feat_q).unwrap())?;
        assert_close(&format!("grad feat_q of layer {i}"), &got, &want, TOL_PLAIN);
        assert!(ours.get(feat_k).is_none(), "feat_k is not a variable");
    }
    Ok(())
}
