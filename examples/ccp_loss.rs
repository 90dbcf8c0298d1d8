//! The main job: the CCP loss and its gradient at the paper's configuration (batch 8, art
//! layers relu2_1, relu3_1, relu4_1 of VGG-19 at a 256 crop, num_s = 8, tau = 0.07) on random
//! non-negative VGG-like features. On the GPU when there is one, with `CcpLoss` (the whole
//! loss in three launches a step, the centres drawn on the device; timed on a stream and as a
//! replayed CUDA graph, then checked against the CPU reference on the centres the device
//! drew), else with the CPU reference alone (an error instead when `CCPL_REQUIRE_GPU=1`, as the
//! GPU run sets, so that a GPU the job cannot use never passes as a CPU run).
//!
//!     cargo run --release --example ccp_loss

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, sys};

use ccpl::cuda::{self, CcpLoss, Kernels};
use ccpl::reference::{ccp_layer_loss, relative_error};
use ccpl::sampling::SplitMix64;
use ccpl::{Centers, FeatureShape, Layout, Tau};

const BATCH: usize = 8;
const NUM_S: usize = 8;
const TAU: Tau = Tau::DEFAULT;
/// The seed of the centres: the CPU reference takes step 0's draw, the GPU draws on the device.
const SEED: u64 = 2022;
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
        .map(|(i, &(name, c, side))| Layer::random(name, c, side, i as u32))
        .collect::<ccpl::Result<_>>()?;
    println!(
        "CCP loss, paper configuration: B={BATCH}, num_s={NUM_S} (S={}), tau={TAU}, layers {}",
        8 * NUM_S,
        LAYERS.map(|l| l.0).join(", ")
    );
    match cuda::context(0) {
        Ok(ctx) => on_gpu(ctx, &layers),
        Err(why) if std::env::var("CCPL_REQUIRE_GPU").as_deref() == Ok("1") => Err(why),
        Err(why) => {
            println!("{why}: running the float64 CPU reference");
            on_cpu(&layers)
        }
    }
}

/// One layer's inputs: the generated image's features (`feat_q`), the content image's
/// (`feat_k`) and the centres of step 0 (those the device draws first).
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
    fn random(name: &'static str, channels: usize, side: usize, layer: u32) -> ccpl::Result<Self> {
        let seed = layer as u64;
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
        let centers = Centers::philox(side, side, NUM_S, SEED, 0, layer)?;
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

fn on_gpu(ctx: Arc<CudaContext>, layers: &[Layer]) -> ccpl::Result<()> {
    // A stream of our own, and cudarc's event tracking off for the buffers below: what a
    // capture into a CUDA graph needs (the legacy default stream cannot be captured).
    // SAFETY: everything below uses this one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let kernels = Kernels::for_context(&ctx)?;
    println!("GPU: {}", ctx.name()?);
    let shapes: Vec<(FeatureShape, usize)> = layers.iter().map(|l| (l.shape, NUM_S)).collect();
    let mut loss = CcpLoss::<f32>::new(kernels, stream.clone(), &shapes, TAU, SEED)?;
    let feats = layers
        .iter()
        .map(|l| Ok((stream.clone_htod(&l.feat_q)?, stream.clone_htod(&l.feat_k)?)))
        .collect::<ccpl::Result<Vec<_>>>()?;
    let mut grads = layers
        .iter()
        .map(|l| stream.alloc_zeros::<f32>(l.shape.len()))
        .collect::<Result<Vec<_>, _>>()?;
    // One training step's loss work: zero the gradients, forward (new centres drawn on the
    // device), backward; three kernel launches.
    let step = |loss: &mut CcpLoss<f32>, grads: &mut [CudaSlice<f32>]| -> ccpl::Result<()> {
        for g in grads.iter_mut() {
            stream.memset_zeros(g)?;
        }
        let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
        loss.forward(&inputs)?;
        loss.backward(None, &mut grads.iter_mut().collect::<Vec<_>>(), None)
    };
    step(&mut loss, &mut grads)?; // warm-up: module load, first launches
    stream.synchronize()?;
    const STEPS: usize = 20;
    let start = Instant::now();
    for _ in 0..STEPS {
        step(&mut loss, &mut grads)?;
    }
    stream.synchronize()?;
    let per_step = ms(start) / STEPS as f64;

    // The same step captured once in a CUDA graph and replayed: each replay draws new centres.
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    step(&mut loss, &mut grads)?;
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))?
        .ok_or_else(|| ccpl::Error::Cuda("the capture recorded no work".into()))?;
    graph.launch()?;
    stream.synchronize()?;
    let start = Instant::now();
    for _ in 0..STEPS {
        graph.launch()?;
    }
    stream.synchronize()?;
    let per_replay = ms(start) / STEPS as f64;
    // The step that ran last: the warm-up, the timed steps, the replays (the capture ran none).
    let last = (1 + STEPS + 1 + STEPS - 1) as u64;

    let (mut total, mut worst) = (0.0, 0.0f64);
    for (i, (layer, grad)) in layers.iter().zip(&grads).enumerate() {
        let centers = Centers::philox(
            layer.shape.height(),
            layer.shape.width(),
            NUM_S,
            SEED,
            last,
            i as u32,
        )?;
        let reference = ccp_layer_loss(
            &layer.feat_q,
            &layer.feat_k,
            &layer.shape,
            &centers,
            TAU,
            false,
        )?;
        let grad: Vec<f64> = stream.clone_dtoh(grad)?.iter().map(|&g| g as f64).collect();
        let grad_err = relative_error(&grad, &reference.grad_feat_q);
        println!(
            "  {:8} loss {:.6}  |grad feat_q| {:.6e}  (vs CPU reference: grad {grad_err:.1e} relative)",
            layer.name,
            reference.loss,
            norm(&grad),
        );
        total += reference.loss;
        worst = worst.max(grad_err);
    }
    let value = stream.clone_dtoh(loss.loss())?[0] as f64;
    worst = worst.max(relative_error(&[value], &[total]));
    println!(
        "total loss {value:.6}  (CPU reference {total:.6}; GPU, forward + backward of all layers: \
         {per_step:.3} ms per step on a stream, {per_replay:.3} ms per CUDA-graph replay, mean of {STEPS})"
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
