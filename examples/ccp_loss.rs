//! The main job: the CCP loss and its gradient at the paper's configuration (batch 8, art
//! layers relu2_1, relu3_1, relu4_1 of VGG-19 at a 256 crop, num_s = 8, tau = 0.07) on random
//! non-negative VGG-like features. On the GPU when there is one (checked against the CPU
//! reference), else with the CPU reference alone.
//!
//!     cargo run --release --example ccp_loss

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice};

use ccpl::cuda::{self, CcpLayer, DeviceCenters, Kernels, Scatter};
use ccpl::reference::{ccp_layer_loss, relative_error};
use ccpl::sampling::SplitMix64;
use ccpl::{Centers, FeatureShape, Layout};

const BATCH: usize = 8;
const NUM_S: usize = 8;
const TAU: f64 = 0.07;
/// (name, channels, side) of the art layers at a 256x256 crop.
const LAYERS: [(&str, usize, usize); 3] = [
    ("relu2_1", 128, 128),
    ("relu3_1", 256, 64),
    ("relu4_1", 512, 32),
];

fn main() -> ccpl::Result<()> {
    let layers: Vec<Layer> = LAYERS
        .iter()
        .enumerate()
        .map(|(i, &(name, c, side))| Layer::random(name, c, side, i as u64))
        .collect::<ccpl::Result<_>>()?;
    println!(
        "CCP loss, paper configuration: B={BATCH}, num_s={NUM_S} (S={}), tau={TAU}, layers {}",
        8 * NUM_S,
        LAYERS.map(|l| l.0).join(", ")
    );
    match cuda::context(0) {
        Ok(ctx) => on_gpu(ctx, &layers),
        Err(why) => {
            println!("{why}: running the float64 CPU reference");
            on_cpu(&layers)
        }
    }
}

/// One layer's inputs: the generated image's features (`feat_q`), the content image's
/// (`feat_k`) and this step's centres.
struct Layer {
    name: &'static str,
    shape: FeatureShape,
    feat_q: Vec<f32>,
    feat_k: Vec<f32>,
    centers: Centers,
}

impl Layer {
    /// VGG-like features: non-negative (after a ReLU, so about half are exact zeros) and
    /// spatially smooth; the generated image's are the content's, changed by a style.
    fn random(name: &'static str, channels: usize, side: usize, seed: u64) -> ccpl::Result<Self> {
        let shape = FeatureShape::new(BATCH, channels, side, side, Layout::Nchw)?;
        let mut rng = Rng(SplitMix64::new(seed));
        let mut content = vec![0.0f32; shape.len()];
        for plane in content.chunks_mut(side * side) {
            let (fy, fx, phase) = (
                rng.uniform() * 0.3,
                rng.uniform() * 0.3,
                rng.uniform() * 6.3,
            );
            for (i, v) in plane.iter_mut().enumerate() {
                let (h, w) = ((i / side) as f32, (i % side) as f32);
                *v = (fy * h + fx * w + phase).sin() + 0.5 * rng.normal();
            }
        }
        let feat_k: Vec<f32> = content.iter().map(|&v| v.max(0.0)).collect();
        let feat_q: Vec<f32> = content
            .iter()
            .map(|&v| (1.3 * v + rng.normal() - 0.1).max(0.0))
            .collect();
        let centers = Centers::sample(side, side, NUM_S, 1000 + seed)?;
        Ok(Self {
            name,
            shape,
            feat_q,
            feat_k,
            centers,
        })
    }
}

fn on_cpu(layers: &[Layer]) -> ccpl::Result<()> {
    let start = Instant::now();
    let mut total = 0.0;
    for layer in layers {
        let out = ccp_layer_loss(
            &layer.feat_q,
            &layer.feat_k,
            &layer.shape,
            &layer.centers,
            TAU,
            false,
        )?;
        println!(
            "  {:8} loss {:.6}  |grad feat_q| {:.6e}",
            layer.name,
            out.loss,
            norm(&out.grad_feat_q)
        );
        total += out.loss;
    }
    println!(
        "total loss {total:.6}  (CPU reference, forward + backward: {:.1} ms)",
        ms(start)
    );
    Ok(())
}

/// One layer's buffers on the device and its loss, with its workspace.
struct GpuLayer {
    feat_q: CudaSlice<f32>,
    feat_k: CudaSlice<f32>,
    grad_q: CudaSlice<f32>,
    centers: DeviceCenters,
    loss: CcpLayer<f32>,
}

fn on_gpu(ctx: Arc<CudaContext>, layers: &[Layer]) -> ccpl::Result<()> {
    let kernels = Kernels::for_context(&ctx)?;
    let stream = ctx.default_stream();
    println!("GPU: {}", ctx.name()?);
    let mut gpu = Vec::new();
    for layer in layers {
        gpu.push(GpuLayer {
            feat_q: stream.clone_htod(&layer.feat_q)?,
            feat_k: stream.clone_htod(&layer.feat_k)?,
            grad_q: stream.alloc_zeros::<f32>(layer.shape.len())?,
            centers: DeviceCenters::upload(&stream, &layer.centers)?,
            loss: CcpLayer::new(kernels.clone(), stream.clone(), layer.shape, NUM_S, TAU)?,
        });
    }
    // One training step's loss work: forward and backward of every layer, back to back.
    let step = |gpu: &mut [GpuLayer]| -> ccpl::Result<()> {
        for l in gpu {
            stream.memset_zeros(&mut l.grad_q)?;
            l.loss.forward(&l.feat_q, &l.feat_k, &l.centers)?;
            l.loss
                .backward(None, &mut l.grad_q, None, Scatter::Deterministic)?;
        }
        Ok(())
    };
    step(&mut gpu)?; // warm-up: module load, first launches
    stream.synchronize()?;
    const STEPS: usize = 20;
    let start = Instant::now();
    for _ in 0..STEPS {
        step(&mut gpu)?;
    }
    stream.synchronize()?;
    let per_step = ms(start) / STEPS as f64;

    let (mut total, mut worst) = (0.0, 0.0f64);
    for (layer, l) in layers.iter().zip(&gpu) {
        let value = stream.clone_dtoh(l.loss.loss())?[0] as f64;
        let grad: Vec<f64> = stream
            .clone_dtoh(&l.grad_q)?
            .iter()
            .map(|&g| g as f64)
            .collect();
        let reference = ccp_layer_loss(
            &layer.feat_q,
            &layer.feat_k,
            &layer.shape,
            &layer.centers,
            TAU,
            false,
        )?;
        let loss_err = relative_error(&[value], &[reference.loss]);
        let grad_err = relative_error(&grad, &reference.grad_feat_q);
        println!(
            "  {:8} loss {value:.6}  |grad feat_q| {:.6e}  (vs CPU reference: loss {loss_err:.1e}, grad {grad_err:.1e} relative)",
            layer.name,
            norm(&grad),
        );
        total += value;
        worst = worst.max(loss_err).max(grad_err);
    }
    println!(
        "total loss {total:.6}  (GPU, forward + backward of all layers: {per_step:.3} ms per step, mean of {STEPS})"
    );
    // The kernels' f32 tolerance (F32_TOLERANCE of the tests); relative_error is infinite for NaN.
    if worst > 1e-5 {
        eprintln!(
            "the GPU disagrees with the CPU reference: worst relative error {worst:.1e} > 1e-5"
        );
        std::process::exit(1);
    }
    Ok(())
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Uniform and normal draws from the crate's seeded generator (Box-Muller).
struct Rng(SplitMix64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0.unit() as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.0.unit().max(1e-12), self.0.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}
