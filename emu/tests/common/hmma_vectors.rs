//! Vectors that tell the tensor cores' arithmetic apart (from the published model's authors'
//! directed tests): one k16 product, only row 0 of A and column 0 of B set (the rest zero),
//! and c. Each with the expected result on sm_90, sm_80 (validated on hardware) and sm_75
//! (inferred), for `emu::hmma_dot` and for a GPU's WMMA.

/// A vector: its name, whether the factors are bf16 (else f16), c, the products
/// `(k, a[k], b[k])`, and the expected result on sm_90, sm_80 and sm_75.
pub struct Vector {
    pub name: &'static str,
    pub bf16: bool,
    pub c: f32,
    pub products: Vec<(usize, f64, f64)>,
    pub expected: [f64; 3],
}

impl Vector {
    /// The 16 factors of each side.
    pub fn factors(&self) -> ([f64; 16], [f64; 16]) {
        let (mut a, mut b) = ([0.0; 16], [0.0; 16]);
        for &(k, x, y) in &self.products {
            (a[k], b[k]) = (x, y);
        }
        (a, b)
    }

    /// The expected result on `sm_{arch}`, where one was published (75, 80, 86, 89, 90, 100).
    pub fn expected_on(&self, arch: u32) -> Option<f32> {
        let i = match arch {
            90 | 100 => 0,
            80 | 86 | 89 => 1,
            75 => 2,
            _ => return None,
        };
        Some(self.expected[i] as f32)
    }
}

pub fn vectors() -> Vec<Vector> {
    let t = 2f64.powi(-12);
    let h = 2f64.powi(-13);
    let one = 1.0 + 2f64.powi(-23); // 0x1.000002p+0
    let v = |name, bf16, c, products, expected| Vector {
        name,
        bf16,
        c,
        products,
        expected,
    };
    vec![
        v(
            "V1 one extra bit",
            false,
            1.0,
            vec![(0, t, t), (1, t, t)],
            [one, one, 1.0],
        ),
        v(
            "V2 two extra bits",
            false,
            1.0,
            vec![(0, t, t), (1, t, h), (2, t, h)],
            [one, 1.0, 1.0],
        ),
        v(
            "V3 not three extra bits",
            false,
            1.0,
            vec![(0, t, t), (1, t, h), (2, h, h), (3, h, h)],
            [1.0; 3],
        ),
        v(
            "V4 final rounding toward zero",
            false,
            1.0,
            vec![(0, 3.0 * t, t)],
            [one; 3],
        ),
        v(
            "V5 the same, negative",
            false,
            -1.0,
            vec![(0, -3.0 * t, t)],
            [-one; 3],
        ),
        v(
            "V6 one block of 16",
            false,
            0.0,
            vec![(0, 1.0, 1.0), (1, t, t), (15, t, t)],
            [one, 1.0, 1.0],
        ),
        v(
            "V7 blocks of 8 in ascending k",
            false,
            0.0,
            vec![(0, t, t), (8, 1.0, 1.0), (9, t, t)],
            [one, one, 1.0],
        ),
        v(
            "V8 product exponent e(a) + e(b)",
            false,
            0.0,
            vec![(0, 1.5, 1.5), (1, -1.5, 1.5), (2, t, h), (3, t, h)],
            [2f64.powi(-24), 0.0, 0.0],
        ),
        v(
            "V9 truncation in sign-magnitude",
            false,
            1.0,
            vec![(0, -h, h)],
            [1.0; 3],
        ),
        v(
            "V11 bf16 subnormal result",
            true,
            0.0,
            vec![(0, 1.5 * 2f64.powi(-74), 2f64.powi(-75))],
            [2f64.powi(-149); 3],
        ),
    ]
}
