//! The device sampler against known answers: fixed centres for a fixed seed at steps 2^32 - 1
//! and 2^32, written here, drawn by the device over two launches on one set of buffers. Each
//! was computed once and is derived again below from the Philox words (`philox4x32_10`, which
//! Random123's known answers check) by the sampler's spec, written out: Lemire's multiply-shift
//! over the interior, with its rejection, and a position equal to an earlier one drawn again.
//! The parameters take the branches the statistical tests take rarely or never by design: a
//! rejected word (probability about 2^-12 a word on a 1000x1000 interior), a word that needs
//! the threshold and passes it (about 2^-19), a repeat, and draws that run into the second
//! block of four words.

use crate::kernel_sampler::draws;

use ccpl::Centers;
use ccpl::sampling::philox4x32_10;
use common::device::TestDevice;

use crate::common;

/// The seed, found by a search over the Philox words, whose first block of words takes the
/// rare branches at step 2^32 - 1.
const SEED: u64 = 0x5eed_0000_0b6a_9706;
const STEP: u64 = (1 << 32) - 1;

/// The maps `(H, W, num_s)` of layers 0 to 3: two of 1000x1000 interiors, one of 4 interior
/// positions drawn in full, one of a single position.
const MAPS: [(usize, usize, usize); 4] = [(1002, 1002, 4), (1002, 1002, 4), (4, 4, 4), (3, 3, 1)];

/// The centres of each layer at steps 2^32 - 1 and 2^32.
const KNOWN: [[&[i32]; 4]; 2] = [
    [
        &[440781, 428199, 267613, 979836],
        &[49616, 87647, 815926, 198049],
        &[10, 6, 9, 5],
        &[4],
    ],
    [
        &[173544, 33918, 425529, 284631],
        &[317454, 679812, 373121, 12087],
        &[5, 9, 10, 6],
        &[4],
    ],
];

/// What happened to each word of a draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    /// Rejected: its low product fell below `2^32 mod n`.
    Rejected,
    /// Its low product fell below `n`, so the threshold was computed, and it passed.
    PassedThreshold,
    /// Its position repeats an earlier centre.
    Repeat,
    /// A new centre.
    Drawn,
}

/// The sampler's spec for layer `layer` of an `h x w` map at `step`: word `i` of the stream is
/// word `i % 4` of Philox at the counter `(step low, step high, layer, i / 4)` under the key
/// `(seed low, seed high)`; a word `x` gives `v = x n / 2^32` unless the low half of `x n` is
/// below `2^32 mod n` (then the next word); `v` is the interior position `(v / (W-2) + 1, v %
/// (W-2) + 1)`, taken unless it was drawn before. The centres, and what each word did.
fn spec(
    seed: u64,
    step: u64,
    layer: u32,
    (h, w, num_s): (usize, usize, usize),
) -> (Vec<i32>, Vec<Word>) {
    let n = ((h - 2) * (w - 2)) as u64;
    let key = [seed as u32, (seed >> 32) as u32];
    let mut words = (0u32..)
        .flat_map(|block| philox4x32_10([step as u32, (step >> 32) as u32, layer, block], key));
    let (mut centres, mut trace) = (Vec::new(), Vec::new());
    while centres.len() < num_s.min(n as usize) {
        let product = u64::from(words.next().unwrap()) * n;
        let low = product % (1 << 32);
        if low < n {
            if low < (1 << 32) % n {
                trace.push(Word::Rejected);
                continue;
            }
            trace.push(Word::PassedThreshold);
        }
        let v = (product >> 32) as usize;
        let position = ((v / (w - 2) + 1) * w + v % (w - 2) + 1) as i32;
        if centres.contains(&position) {
            trace.push(Word::Repeat);
        } else {
            trace.push(Word::Drawn);
            centres.push(position);
        }
    }
    (centres, trace)
}

/// The known answers follow from the spec and are the host model's (`Centers::philox`), and
/// the branches are taken where they are said to be. By hand, layer 2 at step 2^32 - 1: its
/// words begin 0xc0763bd5, 0x4c2c5512, 0x66eff1af, 0xa91450eb, 0x3064ded2; times n = 4 their
/// high halves (the words' top two bits) are 3, 1, 1, 2, 0, the interior positions (h, w) =
/// (2, 2), (1, 2), (1, 2) again, (2, 1), (1, 1), so the flat centres (4 wide) 10, 6, 9, 5.
#[test]
fn known_answers_follow_the_spec() {
    use Word::*;
    for (s, known) in KNOWN.iter().enumerate() {
        let step = STEP + s as u64;
        for (l, (&map, &want)) in MAPS.iter().zip(known).enumerate() {
            let (centres, _) = spec(SEED, step, l as u32, map);
            assert_eq!(centres, want, "step {step} layer {l}: the spec");
            let (h, w, num_s) = map;
            let model = Centers::philox(h, w, num_s, SEED, step, l as u32).unwrap();
            assert_eq!(model.flat(), want, "step {step} layer {l}: the host model");
        }
    }
    let trace = |step, l: usize| spec(SEED, step, l as u32, MAPS[l]).1;
    assert_eq!(trace(STEP, 0), [Rejected, Drawn, Drawn, Drawn, Drawn]);
    assert_eq!(
        trace(STEP, 1),
        [Drawn, PassedThreshold, Drawn, Drawn, Drawn]
    );
    assert_eq!(trace(STEP, 2), [Drawn, Drawn, Repeat, Drawn, Drawn]);
    let repeats = [Drawn, Drawn, Repeat, Repeat, Repeat, Repeat, Drawn, Drawn];
    assert_eq!(trace(STEP + 1, 2), repeats);
    assert_eq!(
        philox4x32_10([STEP as u32, 0, 2, 0], [SEED as u32, (SEED >> 32) as u32])[0],
        0xc0763bd5
    );
}

/// The device draws the known answers at steps 2^32 - 1 and 2^32, one launch each on one set
/// of buffers (`draws` also checks the maps and the counters after each launch).
fn device_draws_the_known_answers<D: TestDevice>(dev: &D) {
    let got = draws(dev, &MAPS, SEED, STEP..STEP + 2);
    for (s, (got, known)) in got.iter().zip(&KNOWN).enumerate() {
        for (l, (got, &want)) in got.iter().zip(known).enumerate() {
            assert_eq!(
                got,
                want,
                "step 2^32 - 1 + {s}, layer {l}, on the {}",
                dev.name()
            );
        }
    }
}

on_every_device!(device_draws_the_known_answers);
