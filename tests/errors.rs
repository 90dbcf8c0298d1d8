//! Every error the reference and its inputs can report: the variant, and a message that
//! names the problem. Bad input is an `Err`, never a panic.

use ccpl::reference::{
    LayerInput, ccp_layer_loss, ccp_loss, info_nce_backward, info_nce_forward, neighbor_diff,
    neighbor_diff_backward, normalize_rows, normalize_rows_backward, similarity,
};
use ccpl::{Centers, Error, FeatureShape, Layout, RowShape, Tau, cuda};

/// Asserts that `result` failed and that its message mentions every one of `words`.
fn expect_err<T: std::fmt::Debug>(result: ccpl::Result<T>, words: &[&str]) -> Error {
    let err = result.expect_err("expected an error");
    let msg = err.to_string();
    for word in words {
        assert!(
            msg.contains(word),
            "message {msg:?} does not mention {word:?}"
        );
    }
    err
}

fn shape_3x5x7() -> (FeatureShape, Centers) {
    (
        FeatureShape::new(2, 3, 5, 7, Layout::Nchw).unwrap(),
        Centers::sample(5, 7, 4, 0).unwrap(),
    )
}

#[test]
fn bad_shapes() {
    let is_shape = |e: Error| assert!(matches!(e, Error::Shape(_)), "{e:?}");
    is_shape(expect_err(
        FeatureShape::new(1, 0, 5, 5, Layout::Nchw),
        &["bad shape", "C"],
    ));
    is_shape(expect_err(
        FeatureShape::new(1, 1, 65536, 65536, Layout::Nhwc),
        &["i32"],
    ));
    is_shape(expect_err(RowShape::new(1, 0, 4), &["rows (0)"]));
    is_shape(expect_err(RowShape::new(1, 4, 0), &["width (0)"]));
    is_shape(expect_err(info_nce_forward(&[], 2, 0), &["rows (0)"]));
    is_shape(expect_err(info_nce_forward(&[], usize::MAX, 2), &["i32"]));

    // Centres drawn for another map.
    let (shape, _) = shape_3x5x7();
    let other = Centers::sample(9, 9, 4, 0).unwrap();
    let feat = vec![0.0; shape.len()];
    is_shape(expect_err(
        neighbor_diff(&feat, &shape, &other),
        &["9x9", "5x7"],
    ));
    let mut grad = vec![0.0; shape.len()];
    is_shape(expect_err(
        neighbor_diff_backward(&[], &shape, &other, &mut grad),
        &["9x9", "5x7"],
    ));
    is_shape(expect_err(
        ccp_layer_loss(&feat, &feat, &shape, &other, Tau::DEFAULT, false),
        &["9x9", "5x7"],
    ));

    // Row matrices that are not whole rows.
    is_shape(expect_err(normalize_rows(&[1.0; 6], 0), &["width"]));
    is_shape(expect_err(
        normalize_rows(&[1.0; 7], 3),
        &["7 elements", "width 3"],
    ));
    is_shape(expect_err(normalize_rows(&[], 3), &["0 elements"]));
    is_shape(expect_err(
        normalize_rows_backward(&[1.0; 7], &[1.0; 7], 3),
        &["7 elements", "width 3"],
    ));

    // No layers.
    let none: [LayerInput<'_, f32>; 0] = [];
    is_shape(expect_err(
        ccp_loss(&none, Tau::DEFAULT, false),
        &["at least one layer"],
    ));
}

#[test]
fn bad_buffer_lengths() {
    let (shape, centers) = shape_3x5x7();
    let feat = vec![0.5f32; shape.len()];
    let short = vec![0.5f32; shape.len() - 1];
    let rows_len = shape.batch() * centers.rows() * shape.channels();
    let check = |result: Result<(), Error>, what: &'static str, expected: usize, actual: usize| {
        let err = expect_err(result, &[what, &expected.to_string(), &actual.to_string()]);
        assert_eq!(
            err,
            Error::Length {
                what,
                expected,
                actual
            }
        );
    };
    let n = shape.len();
    check(
        neighbor_diff(&short, &shape, &centers).map(drop),
        "feat",
        n,
        n - 1,
    );
    let mut grad = vec![0.0; n];
    check(
        neighbor_diff_backward(&vec![0.0; rows_len + 1], &shape, &centers, &mut grad),
        "grad_rows",
        rows_len,
        rows_len + 1,
    );
    let mut grad_short = vec![0.0; n - 1];
    check(
        neighbor_diff_backward(&vec![0.0; rows_len], &shape, &centers, &mut grad_short),
        "grad_feat",
        n,
        n - 1,
    );
    check(
        normalize_rows_backward(&[1.0; 6], &[1.0; 3], 3).map(drop),
        "grad_out",
        6,
        3,
    );
    check(
        ccp_layer_loss(&short, &feat, &shape, &centers, Tau::DEFAULT, false).map(drop),
        "feat_q",
        n,
        n - 1,
    );
    check(
        ccp_layer_loss(&feat, &short, &shape, &centers, Tau::DEFAULT, true).map(drop),
        "feat_k",
        n,
        n - 1,
    );

    let rows = RowShape::new(2, 5, 3).unwrap();
    let (ok, bad) = (vec![0.1; 30], vec![0.1; 29]);
    check(
        similarity(&bad, &ok, &rows, Tau::DEFAULT).map(drop),
        "q",
        30,
        29,
    );
    check(
        similarity(&ok, &bad, &rows, Tau::DEFAULT).map(drop),
        "k",
        30,
        29,
    );
    check(
        info_nce_forward(&[0.0; 49], 2, 5).map(drop),
        "logits",
        50,
        49,
    );
    let (logits, lse) = (vec![0.0; 50], vec![0.0; 10]);
    check(
        info_nce_backward(&logits[1..], &lse, &ok, &ok, &rows, Tau::DEFAULT, 1.0, true).map(drop),
        "logits",
        50,
        49,
    );
    check(
        info_nce_backward(&logits, &lse[1..], &ok, &ok, &rows, Tau::DEFAULT, 1.0, true).map(drop),
        "row_lse",
        10,
        9,
    );
    check(
        info_nce_backward(&logits, &lse, &bad, &ok, &rows, Tau::DEFAULT, 1.0, true).map(drop),
        "q",
        30,
        29,
    );
    check(
        info_nce_backward(&logits, &lse, &ok, &bad, &rows, Tau::DEFAULT, 1.0, false).map(drop),
        "k",
        30,
        29,
    );
}

#[test]
fn empty_batch() {
    let words = ["empty batch", "B"];
    assert_eq!(
        expect_err(FeatureShape::new(0, 3, 5, 5, Layout::Nchw), &words),
        Error::EmptyBatch
    );
    assert_eq!(
        expect_err(RowShape::new(0, 8, 3), &words),
        Error::EmptyBatch
    );
    assert_eq!(
        expect_err(info_nce_forward(&[], 0, 8), &words),
        Error::EmptyBatch
    );
}

#[test]
fn map_without_interior() {
    for (h, w) in [(2, 5), (5, 2), (1, 1), (0, 9), (2, 2)] {
        let words = [&format!("{h}x{w}") as &str, "no interior"];
        let expected = Error::NoInterior {
            height: h,
            width: w,
        };
        assert_eq!(
            expect_err(FeatureShape::new(1, 3, h, w, Layout::Nhwc), &words),
            expected
        );
        assert_eq!(expect_err(Centers::sample(h, w, 8, 0), &words), expected);
        assert_eq!(expect_err(Centers::from_flat(h, w, &[0]), &words), expected);
    }
}

#[test]
fn centre_outside_the_interior() {
    // A 5x7 map: the interior is rows 1..=3, columns 1..=5.
    for bad in [0, 6, 7, 13, 4 * 7 + 2, 35, 1000, -1, -8] {
        let err = expect_err(
            Centers::from_flat(5, 7, &[8, bad]),
            &["centre 1", &bad.to_string(), "outside the interior"],
        );
        assert_eq!(
            err,
            Error::CenterOutsideInterior {
                index: 1,
                flat: bad,
                height: 5,
                width: 7
            }
        );
    }
}

#[test]
fn repeated_centre() {
    let err = expect_err(
        Centers::from_flat(5, 7, &[8, 9, 10, 9]),
        &["centre 3", "9", "repeats"],
    );
    assert_eq!(err, Error::CenterRepeated { index: 3, flat: 9 });
}

#[test]
fn no_centres() {
    let words = ["no centres"];
    assert_eq!(
        expect_err(Centers::sample(5, 5, 0, 1), &words),
        Error::NoCenters
    );
    assert_eq!(
        expect_err(Centers::from_flat(5, 5, &[]), &words),
        Error::NoCenters
    );
}

#[test]
fn bad_tau() {
    // Each tau, as the message prints it (briefly: a subnormal is not 300 digits), with the
    // words of the rule it breaks. One rule for the reference and the plans, checked once.
    let subnormal = f64::MIN_POSITIVE / 4.0;
    let cases: [(f64, &str, &[&str]); 10] = [
        (f64::NAN, "NaN", &["not finite"]),
        (f64::INFINITY, "inf", &["not finite"]),
        (f64::NEG_INFINITY, "-inf", &["not finite"]),
        (0.0, "0", &["not > 0"]),
        (-0.0, "-0", &["not > 0"]),
        (-0.07, "-0.07", &["not > 0"]),
        (subnormal, "5.562684646268003e-309", &["2/tau", "float32"]),
        (1e-300, "1e-300", &["2/tau", "float32"]),
        (2.9e-39, "2.9e-39", &["2/tau", "float32"]),
        // 1/tau fits float32 here, but a row loss of 2/tau would not.
        (3e-39, "3e-39", &["2/tau", "float32"]),
    ];
    for (tau, printed, words) in cases {
        for result in [Tau::new(tau), Tau::try_from(tau)] {
            let err = expect_err(
                result,
                &[&[&format!("bad tau {printed}:")[..]], words].concat(),
            );
            assert!(
                matches!(err, Error::Tau(t) if t.to_bits() == tau.to_bits()),
                "{err:?} for tau {printed}"
            );
            assert!(err.to_string().len() < 120, "{err}");
        }
    }
    // The smallest tau of the rule works in the reference and the plans: 2/tau is f32::MAX.
    let (shape, centers) = shape_3x5x7();
    let feat = vec![0.5f64; shape.len()];
    let smallest = Tau::new(2.0 / f32::MAX as f64).unwrap();
    assert_eq!(smallest, Tau::MIN);
    assert_eq!(2.0 * smallest.inverse(), f32::MAX);
    assert!(ccpl::loss::layer::LayerPlan::new(shape, centers.len(), smallest).is_ok());
    let loss = ccp_layer_loss(&feat, &feat, &shape, &centers, smallest, false).unwrap();
    assert!(loss.loss.is_finite(), "{loss:?}");
    // The value and its forms.
    assert_eq!((Tau::DEFAULT.get(), Tau::default()), (0.07, Tau::DEFAULT));
    assert_eq!(f64::from(Tau::new(0.5).unwrap()), 0.5);
    assert_eq!(Tau::DEFAULT.to_string(), "0.07");
    assert_eq!(Tau::MIN.to_string(), "5.877472104436075e-39");
}

/// What a careless caller can reach from safe code gives an answer or an error, never a
/// panic or an overflow: indices out of range, sizes beyond usize, an empty range to draw from.
#[test]
fn no_panic_from_safe_code() {
    let shape = FeatureShape::new(2, 3, 4, 5, Layout::Nchw).unwrap();
    assert_eq!(shape.index(1, 2, 3, 4), Some(shape.len() - 1));
    for (b, c, h, w) in [(2, 0, 0, 0), (0, 3, 0, 0), (0, 0, 4, 0), (0, 0, 0, 5)] {
        assert_eq!(shape.index(b, c, h, w), None);
    }
    assert_eq!(
        shape.index(usize::MAX, usize::MAX, usize::MAX, usize::MAX),
        None
    );
    let err = ccpl::launch::neighbor::rows_len(&shape, usize::MAX).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err:?}");
    assert_eq!(ccpl::sampling::SplitMix64::new(1).below(0), None);
    // The largest row shapes new accepts: every size they report is in range.
    for (b, s, c) in [(1, i32::MAX as usize, 1), (i32::MAX as usize, 1, 1 << 20)] {
        let rows = RowShape::new(b, s, c).unwrap();
        assert_eq!(rows.len(), b * s * c);
        assert_eq!(rows.logits_len(), b * s * s);
    }
    is_shape_error(RowShape::new(i32::MAX as usize, i32::MAX as usize, 2));
}

fn is_shape_error<T: std::fmt::Debug>(result: ccpl::Result<T>) {
    assert!(matches!(result, Err(Error::Shape(_))), "{result:?}");
}

#[test]
fn no_gpu_without_a_driver() {
    if cuda::driver_present() {
        eprintln!("SKIPPED no_gpu_without_a_driver: this machine has a CUDA driver");
        return;
    }
    let err = expect_err(cuda::context(0), &["no GPU", "driver"]);
    assert!(matches!(err, Error::NoGpu(_)), "{err:?}");
    assert!(matches!(cuda::device_count(), Err(Error::NoGpu(_))));
}

#[test]
fn kernels_not_built_is_reported_as_such() {
    match ccpl::ffi::NOT_BUILT {
        Some(why) => {
            let err = expect_err(cuda::kernels_built(), &["not built", why]);
            assert_eq!(err, Error::KernelsNotBuilt(why));
        }
        None => assert_eq!(cuda::kernels_built(), Ok(())),
    }
    let msg = Error::KernelsNotBuilt("nvcc was not found").to_string();
    assert!(
        msg.contains("CUDA kernels were not built") && msg.contains("nvcc was not found"),
        "{msg}"
    );
}
