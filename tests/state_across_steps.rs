//! The state the device keeps between calls, over several steps on one workspace, as
//! consecutive training steps or the replays of a captured step run it: the sampler's step
//! counter (from 0 and from just below 2^32, where its high word carries), the counts of
//! finished blocks (each launch's last block resets its count, or the next launch's last block
//! never knows it is last), and the centres with their maps (each step's gather clears the
//! previous step's centres out of the map). Every test before these started from fresh
//! counters at step 0 and ran one step. The sampler's known answers, which take its rarely
//! taken branches, are in [`sampler`].

use crate::common;
use crate::kernel_small_s::{BOTH_SIDES, check_steps, layer};

use ccpl::launch::small_s;
use ccpl::loss::multi_layer::Draw;
use ccpl::loss::small_s::SmallRowsPlan;
use ccpl::{Layout, RowShape, Tau};
use common::device::TestDevice;
use common::fixtures::{random, small_rows_workspace};
use common::models::rows_model;
use common::tolerance::{F32_TOLERANCE, to_f64};
use common::{Rng, assert_close};

mod sampler;

/// The step just below 2^32 where a run starts to cross the 32-bit boundary of the counter.
const NEAR_2_32: u64 = (1 << 32) - 2;

/// Three consecutive training steps of a loss on one workspace (the forward with the centres
/// drawn on the device, the backward into both sides), each against the reference on that
/// step's centres (the host model's `Centers::philox(.., seed, step, layer)`, which `run`
/// compares with the device's centres and map): a small-S layer, one whose draw is its whole
/// interior (12 positions: many draws repeat and are drawn again), and a layer on the fused
/// path (S = 520), whose centres the same gather draws. From step 0 and from 2^32 - 2 (steps
/// 2^32 - 2, 2^32 - 1, 2^32). After each step the counters hold the seed, the next step and no
/// counted block; the next step agreeing proves the reset took.
fn training_steps_agree_with_the_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(41);
    let cases = [
        layer((2, 5, 9, 11), 7, Layout::Nchw, false),
        layer((1, 3, 6, 5), 12, Layout::Nhwc, false),
        layer((1, 3, 11, 11), 65, Layout::Nchw, false),
    ];
    for start in [0, NEAR_2_32] {
        let draws = [Draw::Sample; 3];
        let name = format!("consecutive steps from {start}");
        check_steps::<f32, D>(dev, &cases, &draws, start, &BOTH_SIDES, &mut rng, &name);
    }
}

/// Steps with the caller's centres between drawn ones, on one workspace (what
/// `CcpLoss::forward_with_centers` does between training steps): a given step leaves the step
/// counter as it is, and the drawn step after it clears the given centres out of the map and
/// draws the step it was at. bf16, from 2^32 - 2.
fn given_centres_between_drawn_steps<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(43);
    let cases = [
        layer((2, 4, 7, 8), 9, Layout::Nhwc, false),
        layer((1, 6, 5, 5), 9, Layout::Nchw, false),
    ];
    let draws = [Draw::Sample, Draw::Given, Draw::Sample, Draw::Given];
    let name = "given and drawn centres";
    check_steps::<half::bf16, D>(dev, &cases, &draws, NEAR_2_32, &BOTH_SIDES, &mut rng, name);
}

/// The rows loss of a learned head, three forwards on one workspace and one set of counters,
/// new rows each time (S = 40: three 16-row tiles, so the loss is summed by whichever block
/// finishes last): each loss against the model, and its count of finished blocks back at 0.
fn rows_loss_steps_reuse_the_counters<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(47);
    let shape = RowShape::new(2, 40, 6).unwrap();
    let tau = Tau::DEFAULT;
    let plan = SmallRowsPlan::new(shape, tau).unwrap();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    let counters_buf = dev.buf(&mut counters);
    for step in 0..3 {
        let rows_q: Vec<f32> = random(&mut rng, shape.len(), 1.0);
        let rows_k: Vec<f32> = random(&mut rng, shape.len(), 1.0);
        let (mut q_dev, mut k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
        plan.forward::<f32, _>(
            &dev.launcher(),
            dev.buf(&mut q_dev),
            dev.buf(&mut k_dev),
            &bufs,
            counters_buf,
        )
        .unwrap();
        let exact = rows_model::<f64>(&to_f64(&rows_q), &to_f64(&rows_k), &shape, tau, 1.0);
        let what = format!("rows loss, step {step} on the {}", dev.name());
        let loss = dev.download(&ws.loss)[0] as f64;
        assert_close(&what, &[loss], &[exact.loss], F32_TOLERANCE);
        assert_eq!(
            dev.download(&counters),
            [0; small_s::COUNTERS],
            "{what}: no finished block left counted"
        );
    }
}

on_every_device!(
    training_steps_agree_with_the_reference,
    given_centres_between_drawn_steps,
    rows_loss_steps_reuse_the_counters
);
