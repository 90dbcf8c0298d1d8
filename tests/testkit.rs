//! The test kit (`ccpl-testkit`, which does not depend on ccpl) gives the crate's numbers: its
//! generator the stream of `ccpl::sampling::SplitMix64`, its `rel_err` the crate's measure of
//! agreement, so that tests seeded or measured with either agree.

use ccpl::reference::relative_error;
use ccpl::sampling::SplitMix64;
use ccpl_testkit::{Rng, rel_err};

#[test]
fn the_generator_is_the_crates() {
    for seed in [0, 1, 7, 0x5eed_cc91, u64::MAX] {
        let (mut kit, mut crate_rng) = (Rng::new(seed), SplitMix64::new(seed));
        for _ in 0..1000 {
            assert_eq!(kit.next_u64(), crate_rng.next_u64(), "seed {seed}");
            assert_eq!(
                kit.unit().to_bits(),
                crate_rng.unit().to_bits(),
                "seed {seed}"
            );
        }
    }
}

#[test]
fn the_measure_is_the_crates() {
    let mut rng = Rng::new(3);
    let (a, b) = (rng.vec(100), rng.vec(100));
    let zeros = vec![0.0; 100];
    let (mut nan, mut inf) = (a.clone(), a.clone());
    nan[50] = f64::NAN;
    inf[3] = f64::INFINITY;
    for (x, y) in [
        (&a, &b),
        (&a, &a),
        (&a, &zeros),
        (&zeros, &zeros),
        (&nan, &b),
        (&b, &inf),
    ] {
        assert_eq!(rel_err(x, y).to_bits(), relative_error(x, y).to_bits());
    }
}
