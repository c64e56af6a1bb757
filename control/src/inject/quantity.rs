//! Kubernetes resource quantities (`50m`, `256Mi`, `1.5`, `2e3`), parsed only far enough to
//! check an annotation before it lands in a pod spec: that the API server will take it, that
//! it is not negative, and that a request does not exceed its limit (which the API server
//! would refuse, failing the whole workload at admission).

/// A quantity as the user wrote it (trimmed) and its value in base units (cores, bytes).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Quantity {
    pub text: String,
    pub value: f64,
}

/// The suffixes Kubernetes accepts, with their multipliers.
const SUFFIXES: &[(&str, f64)] = &[
    ("Ki", 1024.0),
    ("Mi", 1048576.0),
    ("Gi", 1073741824.0),
    ("Ti", 1099511627776.0),
    ("Pi", 1125899906842624.0),
    ("Ei", 1152921504606846976.0),
    ("n", 1e-9),
    ("u", 1e-6),
    ("m", 1e-3),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

impl Quantity {
    /// Parses `text` with the grammar of Kubernetes' `resource.Quantity`: a non-negative
    /// decimal number, then a binary suffix (`Ki`…`Ei`), a decimal one (`n u m k M G T P E`)
    /// or an exponent (`e3`, `E-2`).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let unsigned = text.strip_prefix('+').unwrap_or(text);
        if unsigned.starts_with('-') {
            return Err("it is negative".to_string());
        }
        let split = unsigned.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(unsigned.len());
        let (number, suffix) = unsigned.split_at(split);
        let well_formed = number.bytes().any(|b| b.is_ascii_digit()) && number.matches('.').count() <= 1;
        let not_a_quantity = || "not a Kubernetes quantity (like 100m, 0.5, 64Mi or 1Gi)".to_string();
        if !well_formed {
            return Err(not_a_quantity());
        }
        let number: f64 = number.parse().map_err(|_| not_a_quantity())?;
        // `E` alone is the exa suffix; `E` or `e` followed by digits, an exponent.
        let multiplier = match SUFFIXES.iter().find(|(name, _)| *name == suffix) {
            _ if suffix.is_empty() => 1.0,
            Some((_, m)) => *m,
            None if suffix.starts_with(['e', 'E']) => exponent(&suffix[1..]).ok_or_else(not_a_quantity)?,
            None => return Err(not_a_quantity()),
        };
        Ok(Quantity { text: text.to_string(), value: number * multiplier })
    }
}

/// `3` → 1e3, `-2` → 1e-2; the digits must be there and the result a finite number.
fn exponent(s: &str) -> Option<f64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let e: i32 = s.parse().ok()?;
    let m = 10f64.powi(e);
    m.is_finite().then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> f64 {
        Quantity::parse(s).unwrap_or_else(|e| panic!("{s}: {e}")).value
    }

    #[test]
    fn the_forms_kubernetes_accepts_parse_to_base_units() {
        assert_eq!(value("50m"), 0.05);
        assert_eq!(value("0.5"), 0.5);
        assert_eq!(value("2"), 2.0);
        assert_eq!(value("+1"), 1.0);
        assert_eq!(value(".5"), 0.5);
        assert_eq!(value("256Mi"), 268435456.0);
        assert_eq!(value("1Gi"), 1073741824.0);
        assert_eq!(value("128M"), 128e6);
        assert_eq!(value("1e3"), 1000.0);
        assert_eq!(value("5E-1"), 0.5);
        assert_eq!(value("1E"), 1e18);
        assert_eq!(value(" 64Ki "), 65536.0);
        assert_eq!(Quantity::parse(" 64Ki ").unwrap().text, "64Ki");
    }

    proptest::proptest! {
        /// Annotation values come from users' manifests: any string gets an answer, no panic.
        #[test]
        fn any_text_is_parsed_or_refused(text in "\\PC{0,12}") {
            let _ = Quantity::parse(&text);
        }

        /// Every well-formed quantity parses to the number times its suffix.
        #[test]
        fn well_formed_quantities_parse(whole in 0u32..100_000, frac in proptest::option::of(0u32..1000), suffix in proptest::sample::select(vec!["", "m", "k", "M", "G", "Ki", "Mi", "Gi", "e2", "E-3"])) {
            let number = match frac {
                Some(f) => format!("{whole}.{f}"),
                None => whole.to_string(),
            };
            let q = Quantity::parse(&format!("{number}{suffix}")).unwrap();
            let multiplier = match suffix {
                "" => 1.0, "m" => 1e-3, "k" => 1e3, "M" => 1e6, "G" => 1e9,
                "Ki" => 1024.0, "Mi" => 1048576.0, "Gi" => 1073741824.0, "e2" => 100.0, _ => 1e-3,
            };
            let expected = number.parse::<f64>().unwrap() * multiplier;
            proptest::prop_assert!((q.value - expected).abs() <= expected.abs() * 1e-12);
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_value_named() {
        for bad in ["", "Mi", "256 Mi", "256mb", "256MB", "1.2.3", "abc", "1x", "1e", "1e+", "1ee3", "0x10", "1e999"] {
            let err = Quantity::parse(bad).expect_err(bad);
            assert!(err.contains("not a Kubernetes quantity"), "{bad}: {err}");
        }
        assert!(Quantity::parse("-1").unwrap_err().contains("negative"));
        assert!(Quantity::parse("-100Mi").unwrap_err().contains("negative"));
    }
}
