//! A strict parser for the Prometheus / OpenMetrics text exposition format, so tests can
//! check that `/metrics` is well-formed and read values from it. Strict where scrapers
//! are: metric and label name grammar, label value escapes, float values, every sample in
//! a declared family with a suffix its type allows, no family declared twice, `# EOF` only
//! at the end, and histograms whose buckets are cumulative and end in `+Inf` = `_count`.
//! Text ending in `# EOF` is read as OpenMetrics, anything else as the classic format
//! (0.0.4), where a counter's family is named as its samples are, `..._total`, and there
//! is no `# UNIT`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include all of `labels`, summed over
    /// every such sample (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families.values().flat_map(|f| f.samples.iter()).filter(move |s| s.name == name)
    }
}

/// Which of the two formats a text is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

pub fn format(text: &str) -> Format {
    if text.lines().any(|l| l == "# EOF") { Format::OpenMetrics } else { Format::Classic }
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let fmt = format(text);
    let mut exp = Exposition::default();
    let mut current: Option<String> = None;
    let mut eof = false;
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if eof {
            return Err(at("content after # EOF".into()));
        }
        if line == "# EOF" {
            eof = true;
        } else if let Some(rest) = line.strip_prefix("# ") {
            directive(&mut exp, &mut current, rest, fmt).map_err(at)?;
        } else if line.starts_with('#') || line.is_empty() {
            return Err(at("malformed comment or empty line".into()));
        } else {
            let s = sample(line).map_err(at)?;
            let fam = current.as_ref().ok_or_else(|| at("sample before any # TYPE".into()))?;
            let family = exp.families.get_mut(fam).ok_or_else(|| at("no family".into()))?;
            if !suffix_allowed(&family.kind, fam, &s.name, fmt) {
                return Err(at(format!("sample {} does not belong to {} family {fam}", s.name, family.kind)));
            }
            family.samples.push(s);
        }
    }
    for (name, f) in &exp.families {
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
    }
    Ok(exp)
}

fn directive(exp: &mut Exposition, current: &mut Option<String>, rest: &str, fmt: Format) -> Result<(), String> {
    let mut parts = rest.splitn(3, ' ');
    let (kw, name, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    match kw {
        "TYPE" => {
            let kind = arg.ok_or("TYPE without a type")?;
            let known: &[&str] = match fmt {
                Format::OpenMetrics => &["counter", "gauge", "histogram", "summary", "unknown", "info", "stateset"],
                Format::Classic => &["counter", "gauge", "histogram", "summary", "untyped"],
            };
            if !known.contains(&kind) {
                return Err(format!("unknown type {kind}"));
            }
            let fam = exp.families.entry(name.to_string()).or_default();
            if !fam.kind.is_empty() {
                return Err(format!("family {name} declared twice"));
            }
            fam.kind = kind.to_string();
            *current = Some(name.to_string());
        }
        "HELP" => exp.families.entry(name.to_string()).or_default().help = arg.map(str::to_string),
        "UNIT" if fmt == Format::OpenMetrics => {}
        other => return Err(format!("unknown directive {other}")),
    }
    Ok(())
}

fn suffix_allowed(kind: &str, family: &str, sample: &str, fmt: Format) -> bool {
    let Some(suffix) = sample.strip_prefix(family) else { return false };
    match kind {
        "counter" if fmt == Format::Classic => suffix.is_empty(),
        "counter" => ["_total", "_created"].contains(&suffix),
        "histogram" => ["_bucket", "_count", "_sum", "_created"].contains(&suffix),
        "summary" => ["", "_count", "_sum", "_created"].contains(&suffix),
        "info" => suffix == "_info",
        _ => suffix.is_empty(),
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = float(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the `}`.
fn labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((out, rest));
        }
        let eq = s.find('=').ok_or("label without =")?;
        let name = &s[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let (value, rest) = quoted(s[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?)?;
        if out.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        s = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A label value up to its closing quote, with `\\`, `\"` and `\n` escapes.
fn quoted(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => return Err(format!("bad escape {other:?}")),
            },
            '\n' => return Err("newline in label value".into()),
            c => out.push(c),
        }
    }
    Err("unterminated label value".into())
}

fn float(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
    }
}

/// One histogram series: its (le, cumulative count) buckets and its `_count`.
type Series = (Vec<(f64, f64)>, Option<f64>);

/// Per label set (without `le`): buckets cumulative, last `+Inf`, equal to `_count`.
fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for s in &f.samples {
        let key: Vec<(String, String)> =
            s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
        let entry = series.entry(key).or_default();
        if s.name.ends_with("_bucket") {
            let le = float(s.labels.get("le").ok_or(format!("{name}: bucket without le"))?)?;
            entry.0.push((le, s.value));
        } else if s.name.ends_with("_count") {
            entry.1 = Some(s.value);
        }
    }
    for (labels, (buckets, count)) in series {
        let ok_order = buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let last = buckets.last().copied();
        if !ok_order || last.map(|b| b.0) != Some(f64::INFINITY) || last.map(|b| b.1) != count {
            return Err(format!("{name}{labels:?}: buckets not cumulative or +Inf != _count: {buckets:?} {count:?}"));
        }
    }
    Ok(())
}
