//! The ops on candle's CUDA backend (feature `cuda`), on the first GPU; without one each test
//! says loudly that it SKIPPED (and fails instead when `CCPL_REQUIRE_GPU=1`).
//!
//! - In every storage type, each op and its backward through candle must give exactly the bits
//!   of the same computation by ccpl's own API (`CcpLayer`, `CcpRows`, the `neighbor` kernels)
//!   on the same inputs: the scatter is the deterministic one, so any difference is a fault of
//!   the glue (a wrong buffer, offset, side, upstream gradient or stream), not rounding.
//! - In f32, against the CPU ops (the float64 reference) at the contract's float32 tolerance,
//!   which ccpl's kernels meet (their own tests measure it).
//! - The errors only a GPU can give: f64 refused, inputs on two devices.
#![cfg(feature = "cuda")]

mod usage;

use crate::common;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::{DType, Device, Result, Tensor, Var, WithDType};
use ccpl::cuda::{CcpLayer, CcpRows, DeviceCenters, Kernels, Scatter, neighbor};
use ccpl::{Centers, Dtype, FeatureShape, Layout, RowShape, Tau};
use ccpl_candle::{ccp_layer_loss, neighbor_diff, rows_loss};
use common::{Rng, TensorRng, assert_close, assert_same, rounded, values};

const TAU: f64 = 0.07;
const UPSTREAM: f32 = 2.5;
/// The contract's float32 tolerance (relative norm error) of the kernels against the reference.
const F32_TOLERANCE: f64 = 1e-5;

/// The first GPU, or `None` after saying loudly that `test` SKIPPED (a panic instead when
/// `CCPL_REQUIRE_GPU=1`).
fn gpu(test: &str) -> Option<Device> {
    gpu_made_by(test, Device::new_cuda)
}

/// The first GPU as `new` makes it (candle's `Device::new_cuda` or `new_cuda_with_stream`),
/// or `None` as [`gpu`] says.
fn gpu_made_by(test: &str, new: fn(usize) -> Result<Device>) -> Option<Device> {
    match new(0) {
        Ok(dev) => Some(dev),
        Err(e) if std::env::var("CCPL_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("CCPL_REQUIRE_GPU=1 but {test} cannot run on a GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test} on the GPU: {e}");
            None
        }
    }
}

/// ccpl's API on candle's device: its kernels and candle's stream.
struct Direct {
    kernels: Arc<Kernels>,
    stream: Arc<CudaStream>,
}

impl Direct {
    fn new(dev: &Device) -> Self {
        let stream = dev.as_cuda_device().unwrap().cuda_stream();
        let kernels = Kernels::for_context(stream.context()).expect("ccpl's kernels load");
        Self { kernels, stream }
    }
    fn upload<T: Dtype>(&self, v: &[f64]) -> CudaSlice<T> {
        let v: Vec<T> = v.iter().map(|&x| ccpl::Element::from_f64(x)).collect();
        self.stream.clone_htod(&v).unwrap()
    }
    fn download<T: Dtype>(&self, mem: &CudaSlice<T>) -> Vec<f64> {
        let v = self.stream.clone_dtoh(mem).unwrap();
        self.stream.synchronize().unwrap();
        v.iter().map(|x| ccpl::Element::to_f64(*x)).collect()
    }
}

/// `loss * UPSTREAM` backward: the gradients of `vars`.
fn grads(loss: &Tensor, vars: &[&Tensor]) -> Result<Vec<Vec<f64>>> {
    let grads = (loss * UPSTREAM as f64)?.backward()?;
    vars.iter()
        .map(|v| values(grads.get(v).expect("a tracked input gets a gradient")))
        .collect()
}

/// A variable on `dev` of `dims`, values uniform in `[-scale, scale)` stored in `T`, and those
/// values.
fn input<T: Dtype + WithDType>(
    rng: &mut Rng,
    dims: &[usize],
    scale: f64,
    dev: &Device,
) -> Result<(Tensor, Vec<f64>)> {
    let (t, v) = rng.tensor(dims, scale, T::DTYPE, dev)?;
    Ok((Var::from_tensor(&t)?.into_inner(), v))
}

/// Every op against ccpl's API in `T`: the same bits.
fn same_bits_as_ccpl<T: Dtype + WithDType>(dev: &Device, rng: &mut Rng) -> Result<()> {
    let direct = Direct::new(dev);
    let dtype = T::DTYPE;
    let upstream = direct.stream.clone_htod(&[UPSTREAM]).unwrap();

    // The layer loss, both sides tracked.
    let (b, c, h, w) = (2, 37, 13, 11);
    let shape = FeatureShape::new(b, c, h, w, Layout::Nchw).unwrap();
    let centers = Centers::sample(h, w, 40, rng.next_u64()).unwrap();
    let (feat_q, q) = input::<T>(rng, &[b, c, h, w], 1.0, dev)?;
    let (feat_k, k) = input::<T>(rng, &[b, c, h, w], 1.0, dev)?;
    let loss = ccp_layer_loss(&feat_q, &feat_k, &centers, TAU)?;
    let got = grads(&loss, &[&feat_q, &feat_k])?;

    let mut layer = CcpLayer::<T>::new(
        direct.kernels.clone(),
        direct.stream.clone(),
        shape,
        centers.len(),
        Tau::new(TAU).unwrap(),
    )
    .unwrap();
    let device_centers = DeviceCenters::upload(&direct.stream, &centers).unwrap();
    layer
        .forward(
            &direct.upload::<T>(&q),
            &direct.upload::<T>(&k),
            &device_centers,
        )
        .unwrap();
    let mut grad_q = direct.stream.alloc_zeros::<T>(shape.len()).unwrap();
    let mut grad_k = direct.stream.alloc_zeros::<T>(shape.len()).unwrap();
    layer
        .backward(
            Some(&upstream.as_view()),
            &mut grad_q,
            Some(&mut grad_k),
            Scatter::Deterministic,
        )
        .unwrap();
    let want_loss = rounded(&direct.download(layer.loss()), dtype)?;
    assert_same(
        &format!("layer loss {dtype:?}"),
        &values(&loss)?,
        &want_loss,
    );
    assert_same(
        &format!("layer grad feat_q {dtype:?}"),
        &got[0],
        &direct.download(&grad_q),
    );
    assert_same(
        &format!("layer grad feat_k {dtype:?}"),
        &got[1],
        &direct.download(&grad_k),
    );

    // The rows loss, the generated side tracked.
    let rows = RowShape::new(3, 200, 45).unwrap();
    let (rows_q, q) = input::<T>(rng, &[3, 200, 45], 3.0, dev)?;
    let (rows_k, k) = rng.tensor(&[3, 200, 45], 0.5, dtype, dev)?;
    let loss = rows_loss(&rows_q, &rows_k, TAU)?;
    let got = grads(&loss, &[&rows_q])?;

    let mut ccp_rows = CcpRows::<T>::new(
        direct.kernels.clone(),
        direct.stream.clone(),
        rows,
        Tau::new(TAU).unwrap(),
    )
    .unwrap();
    ccp_rows
        .forward(&direct.upload::<T>(&q), &direct.upload::<T>(&k))
        .unwrap();
    let mut grad_q = direct.stream.alloc_zeros::<T>(rows.len()).unwrap();
    ccp_rows
        .backward(Some(&upstream.as_view()), &mut grad_q, None)
        .unwrap();
    let want_loss = rounded(&direct.download(ccp_rows.loss()), dtype)?;
    assert_same(&format!("rows loss {dtype:?}"), &values(&loss)?, &want_loss);
    assert_same(
        &format!("rows grad q {dtype:?}"),
        &got[0],
        &direct.download(&grad_q),
    );

    // The neighbour differences and their scatter.
    let (feat, f) = input::<T>(rng, &[b, c, h, w], 1.0, dev)?;
    let diff = neighbor_diff(&feat, &centers)?;
    let (weights, wv) = rng.tensor(diff.dims(), 1.0, dtype, dev)?;
    let grad = (&diff * &weights)?.sum_all()?.backward()?;
    let got = values(grad.get(&feat).unwrap())?;

    let mut want_rows = direct.stream.alloc_zeros::<T>(diff.elem_count()).unwrap();
    let (kernels, stream) = (&direct.kernels, &direct.stream);
    let feat_dev = direct.upload::<T>(&f);
    neighbor::neighbor_diff(
        kernels,
        stream,
        &shape,
        &device_centers,
        &feat_dev,
        &mut want_rows,
    )
    .unwrap();
    let mut want_grad = direct.stream.alloc_zeros::<T>(shape.len()).unwrap();
    let scatter = Scatter::Deterministic;
    let weights_dev = direct.upload::<T>(&wv);
    neighbor::neighbor_diff_backward(
        kernels,
        stream,
        &shape,
        &device_centers,
        &weights_dev,
        &mut want_grad,
        scatter,
    )
    .unwrap();
    let want = direct.download(&want_rows);
    assert_same(&format!("neighbour rows {dtype:?}"), &values(&diff)?, &want);
    assert_same(
        &format!("neighbour grad {dtype:?}"),
        &got,
        &direct.download(&want_grad),
    );
    Ok(())
}

#[test]
fn ops_give_the_bits_of_ccpl() -> Result<()> {
    let Some(dev) = gpu("ops_give_the_bits_of_ccpl") else {
        return Ok(());
    };
    let mut rng = Rng::new(31);
    same_bits_as_ccpl::<f32>(&dev, &mut rng)?;
    same_bits_as_ccpl::<half::f16>(&dev, &mut rng)?;
    same_bits_as_ccpl::<half::bf16>(&dev, &mut rng)
}

/// A loss of tensors: a graph of the ops, from its inputs to its scalar.
type Graph<'a> = dyn Fn(&[Tensor]) -> Result<Tensor> + 'a;

/// `inputs` made variables on `dev`, and `graph`'s loss of them there.
fn graph_on(graph: &Graph<'_>, inputs: &[Tensor], dev: &Device) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(|t| Ok(Var::from_tensor(&t.to_device(dev)?)?.into_inner()))
        .collect::<Result<Vec<_>>>()?;
    Ok((graph(&vars)?, vars))
}

/// The loss of `graph` on `inputs` (every one tracked) on `dev`, then each input's gradient.
fn loss_and_grads(graph: &Graph<'_>, inputs: &[Tensor], dev: &Device) -> Result<Vec<Vec<f64>>> {
    let (loss, vars) = graph_on(graph, inputs, dev)?;
    let mut out = vec![values(&loss)?];
    out.extend(grads(&loss, &vars.iter().collect::<Vec<_>>())?);
    Ok(out)
}

/// Asserts that each of `got` (named by `names` after `what`) is within `tolerance(i)` of the
/// same of `want`.
fn assert_each_close(
    what: &str,
    names: &[&str],
    got: &[Vec<f64>],
    want: &[Vec<f64>],
    tolerance: impl Fn(usize) -> f64,
) {
    assert_eq!(got.len(), names.len(), "{what}: one name for each result");
    for (i, name) in names.iter().enumerate() {
        assert_close(&format!("{what} {name}"), &got[i], &want[i], tolerance(i));
    }
}

#[test]
fn f32_matches_the_reference() -> Result<()> {
    let Some(dev) = gpu("f32_matches_the_reference") else {
        return Ok(());
    };
    let mut rng = Rng::new(32);
    let (b, c, h, w) = (3, 64, 17, 19);
    let centers = Centers::sample(h, w, 100, rng.next_u64()).unwrap();
    let (feat_q, _) = rng.tensor(&[b, c, h, w], 1.0, DType::F32, &Device::Cpu)?;
    let (feat_k, _) = rng.tensor(&[b, c, h, w], 1.0, DType::F32, &Device::Cpu)?;
    let layer = |t: &[Tensor]| ccp_layer_loss(&t[0], &t[1], &centers, TAU);
    let feats = [feat_q, feat_k];
    let want = loss_and_grads(&layer, &feats, &Device::Cpu)?;
    let got = loss_and_grads(&layer, &feats, &dev)?;
    let names = ["loss", "grad feat_q", "grad feat_k"];
    assert_each_close("layer", &names, &got, &want, |_| F32_TOLERANCE);

    let (rows_q, _) = rng.tensor(&[2, 600, 129], 3.0, DType::F32, &Device::Cpu)?;
    let (rows_k, _) = rng.tensor(&[2, 600, 129], 0.5, DType::F32, &Device::Cpu)?;
    let rows = |t: &[Tensor]| rows_loss(&t[0], &t[1], TAU);
    let inputs = [rows_q, rows_k];
    let want = loss_and_grads(&rows, &inputs, &Device::Cpu)?;
    let got = loss_and_grads(&rows, &inputs, &dev)?;
    let names = ["loss", "grad q", "grad k"];
    assert_each_close("rows", &names, &got, &want, |_| F32_TOLERANCE);
    Ok(())
}

#[test]
fn gpu_errors_name_the_problem() -> Result<()> {
    let Some(dev) = gpu("gpu_errors_name_the_problem") else {
        return Ok(());
    };
    let centers = Centers::sample(6, 7, 4, 1).unwrap();
    let feat = Tensor::zeros((2, 3, 6, 7), DType::F64, &dev)?;
    let msg = ccp_layer_loss(&feat, &feat, &centers, TAU)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ccpl_candle::ccp_layer_loss") && msg.contains("F64"),
        "{msg}"
    );
    let on_gpu = Tensor::zeros((2, 3, 6, 7), DType::F32, &dev)?;
    let on_cpu = Tensor::zeros((2, 3, 6, 7), DType::F32, &Device::Cpu)?;
    let msg = ccp_layer_loss(&on_gpu, &on_cpu, &centers, TAU)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("same device"), "{msg}");
    let msg = rows_loss(&on_cpu.flatten_from(2)?, &on_gpu.flatten_from(2)?, TAU)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("same device"), "{msg}");
    Ok(())
}
