//! The centres' sampling: the count, distinct interior positions, seeded, the partial
//! Fisher-Yates shuffle, uniform.

use super::*;

#[test]
fn sample_count_is_min_of_num_s_and_interior() {
    for (h, w, num_s) in [
        (3, 3, 1),
        (3, 3, 8),
        (5, 7, 8),
        (5, 7, 15),
        (5, 7, 16),
        (32, 32, 8),
        (4, 9, 1000),
    ] {
        let c = Centers::sample(h, w, num_s, 1).unwrap();
        let expected = num_s.min((h - 2) * (w - 2));
        assert_eq!(c.len(), expected, "{h}x{w}, num_s {num_s}");
        assert_eq!(c.rows(), 8 * expected);
        assert_eq!((c.height(), c.width()), (h, w));
    }
}

#[test]
fn samples_are_distinct_interior_positions() {
    for seed in 0..200 {
        let (h, w) = (5 + seed as usize % 4, 6 + seed as usize % 3);
        let c = Centers::sample(h, w, 7, seed).unwrap();
        let mut seen = std::collections::HashSet::new();
        for &p in c.flat() {
            let (ph, pw) = (p as usize / w, p as usize % w);
            assert!(
                (1..=h - 2).contains(&ph) && (1..=w - 2).contains(&pw),
                "{p} not interior of {h}x{w}"
            );
            assert!(seen.insert(p), "{p} drawn twice");
        }
        // The centre map inverts the list.
        let map = c.center_map();
        assert_eq!(map.iter().filter(|&&x| x >= 0).count(), c.len());
        for (x, &p) in c.flat().iter().enumerate() {
            assert_eq!(map[p as usize], x as i32);
        }
    }
}

#[test]
fn sampling_is_seeded() {
    let mut differ = 0;
    for seed in 0..100 {
        let a = Centers::sample(32, 32, 8, seed).unwrap();
        assert_eq!(
            a,
            Centers::sample(32, 32, 8, seed).unwrap(),
            "seed {seed} not reproducible"
        );
        if a != Centers::sample(32, 32, 8, seed + 1).unwrap() {
            differ += 1;
        }
    }
    // Two draws of 8 from 900 positions coincide with probability ~1e-24.
    assert_eq!(differ, 100, "different seeds gave the same centres");
}

/// The draw is a partial Fisher-Yates shuffle of the interior positions (what the contract
/// says): the sparse one of `Centers::sample` gives, seed for seed, the centres of the plain
/// one written here over the whole interior.
#[test]
fn sampling_is_the_partial_fisher_yates_shuffle() {
    for (h, w, num_s, seed) in [(5, 5, 9, 1), (9, 7, 4, 2), (32, 32, 8, 3), (40, 3, 38, 4)] {
        let (iw, total) = (w - 2, (h - 2) * (w - 2));
        let mut pool: Vec<usize> = (0..total).collect();
        let mut rng = ccpl::sampling::SplitMix64::new(seed);
        let n = num_s.min(total);
        for i in 0..n {
            let j = i + rng.below((total - i) as u64).unwrap() as usize;
            pool.swap(i, j);
        }
        let want: Vec<i32> = pool[..n]
            .iter()
            .map(|&p| ((p / iw + 1) * w + p % iw + 1) as i32)
            .collect();
        assert_eq!(
            Centers::sample(h, w, num_s, seed).unwrap().flat(),
            &want[..]
        );
    }
}

#[test]
fn sampling_is_uniform() {
    // 3 of the 9 interior positions of a 5x5 map, 9000 draws. Under uniform sampling without
    // replacement every position is drawn equally often, the first draw is uniform, and so is
    // each of the 84 subsets. Thresholds: the chi-square quantiles at p = 1e-6 (df 8: 44,
    // df 83: 160); the seeds are fixed, so the test is deterministic. A sampler that skips a
    // position or favours some gives values in the hundreds or thousands.
    let draws = 9000;
    let mut inclusion = [0u64; 25];
    let mut first = [0u64; 25];
    let mut subsets = std::collections::HashMap::new();
    for seed in 0..draws {
        let c = Centers::sample(5, 5, 3, seed).unwrap();
        for &p in c.flat() {
            inclusion[p as usize] += 1;
        }
        first[c.flat()[0] as usize] += 1;
        let mut set = c.flat().to_vec();
        set.sort();
        *subsets.entry(set).or_insert(0u64) += 1;
    }
    let interior = |counts: &[u64; 25]| -> Vec<u64> {
        (0..25)
            .filter(|p| (1..=3).contains(&(p / 5)) && (1..=3).contains(&(p % 5)))
            .map(|p| counts[p])
            .collect()
    };
    assert_eq!(
        interior(&inclusion).iter().sum::<u64>(),
        3 * draws,
        "a centre outside the interior"
    );
    let chi_inclusion = chi_square_uniform(&interior(&inclusion));
    let chi_first = chi_square_uniform(&interior(&first));
    assert_eq!(subsets.len(), 84, "some subsets never drawn");
    let chi_subsets = chi_square_uniform(&subsets.values().copied().collect::<Vec<_>>());
    eprintln!(
        "chi-square: inclusion {chi_inclusion:.1}, first {chi_first:.1} (df 8), subsets {chi_subsets:.1} (df 83)"
    );
    assert!(
        chi_inclusion < 44.0 && chi_first < 44.0,
        "not uniform: {chi_inclusion}, {chi_first}"
    );
    assert!(chi_subsets < 160.0, "subsets not uniform: {chi_subsets}");
}
