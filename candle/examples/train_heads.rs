//! The paper's projection heads trained with the CCP loss in candle. Per art layer of VGG-19 at
//! a 256 crop (relu2_1, relu3_1, relu4_1) a head `Linear(C, C)`, ReLU, `Linear(C, C/4)` (with
//! candle-nn) sits between ccpl-candle's neighbour differences and rows loss; the loss is the
//! sum over the layers, with `num_s = 8` fresh centres per layer and step and `tau = 0.07`.
//! Random VGG-like features stand in for the encoder's; the generated image's features are a
//! variable too, standing in for the generator that makes them. As in the paper (and the
//! original's `PatchNCELoss`), the content side is detached after its head: the gradient
//! reaches the heads and the generated features through the generated side only. A few AdamW
//! steps, the loss printed at each.
//!
//!     cargo run -p ccpl-candle --example train_heads                  # on the CPU
//!     cargo run -p ccpl-candle --example train_heads --features cuda  # on the first GPU
//!
//! A `cuda` build that finds no GPU says so and runs on the CPU (an error instead when
//! `CCPL_REQUIRE_GPU=1`, as the GPU run sets).
//!
//! The paper's batch is 8; on the CPU the example uses 2 to keep the run short (the CPU path is
//! the float64 reference, and debug builds of candle are slow on feature maps of this size).

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, linear};
use ccpl_candle::{Centers, DEFAULT_TAU, neighbor_diff, rows_loss};

/// (name, channels, side) of the art layers at a 256x256 crop.
const LAYERS: [(&str, usize, usize); 3] = [
    ("relu2_1", 128, 128),
    ("relu3_1", 256, 64),
    ("relu4_1", 512, 32),
];
const NUM_S: usize = 8;
const STEPS: usize = 5;

/// The projection head of one layer: `Linear(C, C)`, ReLU, `Linear(C, C/4)`, shared by the
/// generated and the content side.
struct Head {
    expand: Linear,
    project: Linear,
}

impl Head {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            expand: linear(channels, channels, vb.pp("0"))?,
            project: linear(channels, channels / 4, vb.pp("2"))?,
        })
    }
}

impl Module for Head {
    fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        self.project.forward(&self.expand.forward(rows)?.relu()?)
    }
}

/// One layer: its head, the generated image's features (a variable) and the content image's.
struct Layer {
    name: &'static str,
    head: Head,
    feat_q: Var,
    feat_k: Tensor,
}

/// VGG-like features of `(B, C, side, side)`: non-negative (after a ReLU, about half are
/// zeros) and spatially smooth (noise on a 4x coarser grid, upsampled, plus finer noise). The
/// generated image's are the content's changed by a "style".
fn features(batch: usize, channels: usize, side: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let coarse = Tensor::randn(0f32, 1.0, (batch, channels, side / 4, side / 4), dev)?;
    let content = (coarse.upsample_nearest2d(side, side)?
        + (Tensor::randn(0f32, 1.0, (batch, channels, side, side), dev)? * 0.5)?)?;
    let style = Tensor::randn(0f32, 1.0, (batch, channels, side, side), dev)?;
    let generated = ((content.clone() * 1.3)? + style)?
        .affine(1.0, -0.1)?
        .relu()?;
    Ok((generated, content.relu()?))
}

/// The first GPU in a `cuda` build that finds one, else the CPU.
fn device() -> Result<Device> {
    match Device::cuda_if_available(0) {
        Err(e) if std::env::var("CCPL_REQUIRE_GPU").as_deref() != Ok("1") => {
            println!("no GPU ({e}): on the CPU");
            Ok(Device::Cpu)
        }
        dev => dev,
    }
}

fn main() -> Result<()> {
    let dev = device()?;
    let batch = if dev.is_cpu() { 2 } else { 8 };
    println!(
        "CCP loss with the paper's heads on {dev:?}: B={batch}, num_s={NUM_S} (S={}), tau={DEFAULT_TAU}, layers {}",
        8 * NUM_S,
        LAYERS.map(|l| l.0).join(", ")
    );

    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let mut layers = Vec::new();
    for (name, channels, side) in LAYERS {
        let (generated, content) = features(batch, channels, side, &dev)?;
        layers.push(Layer {
            name,
            head: Head::new(channels, vb.pp(name))?,
            feat_q: Var::from_tensor(&generated)?,
            feat_k: content,
        });
    }
    let mut params = vars.all_vars();
    params.extend(layers.iter().map(|l| l.feat_q.clone()));
    let mut opt = AdamW::new(
        params,
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;

    for step in 0..STEPS {
        let start = Instant::now();
        let mut total = Tensor::zeros((), DType::F32, &dev)?;
        let mut losses = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let (_, _, h, w) = layer.feat_q.dims4()?;
            // Fresh centres per layer and step, the same for both sides.
            let centers = Centers::sample(h, w, NUM_S, (step * LAYERS.len() + i) as u64)
                .map_err(candle_core::Error::wrap)?;
            let q = layer
                .head
                .forward(&neighbor_diff(&layer.feat_q, &centers)?)?;
            let k = layer
                .head
                .forward(&neighbor_diff(&layer.feat_k, &centers)?)?
                .detach();
            let loss = rows_loss(&q, &k, DEFAULT_TAU)?;
            total = (total + &loss)?;
            losses.push(loss);
        }
        opt.backward_step(&total)?;
        // Read back after the step: on CUDA these are the step's only waits on the host.
        let value = total.to_scalar::<f32>()?;
        let parts = layers
            .iter()
            .zip(&losses)
            .map(|(layer, loss)| Ok(format!("{} {:.4}", layer.name, loss.to_scalar::<f32>()?)))
            .collect::<Result<Vec<_>>>()?;
        println!(
            "step {step}: loss {value:.4} ({}) in {:.2} s",
            parts.join(", "),
            start.elapsed().as_secs_f64()
        );
        if !value.is_finite() {
            candle_core::bail!("the loss is not finite at step {step}");
        }
    }
    Ok(())
}
