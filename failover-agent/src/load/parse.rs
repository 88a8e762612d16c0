//! Exposition text -> [`Figures`], with `prom_text_format_parser` (strict:
//! a malformed line refuses the whole scrape, where a lenient parser would
//! drop it and leave a metric silently missing).

use prom_text_format_parser::{Scrape, Type, ValueType};

use super::{Figures, Refusal};
use crate::config::ProfileNames;

/// Most of a body read: a model server's whole exposition (histograms
/// included) is a few hundred KiB at most.
pub const MAX_BODY: usize = 1 << 20;

/// Most sample lines parsed: the parser builds every sample, so the count
/// is checked before it runs.
pub const MAX_SAMPLES: usize = 20_000;

/// More requests than any engine queues or runs: a counter mistaken for a
/// gauge, or garbage.
pub const MAX_REQUESTS: f64 = 1_000_000.0;

/// Reads the figures `names` point at from exposition `text`.
pub fn parse(text: &[u8], names: &ProfileNames<'_>) -> Result<Figures, Refusal> {
    if text.len() > MAX_BODY {
        return Err(Refusal::TooLarge);
    }
    let text =
        std::str::from_utf8(text).map_err(|e| Refusal::Malformed(format!("not UTF-8 ({e})")))?;
    let samples = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .count();
    if samples > MAX_SAMPLES {
        return Err(Refusal::TooManySamples);
    }
    let scrape = Scrape::parse(text).map_err(|e| Refusal::Malformed(describe(&e)))?;
    let waiting = sum(&scrape, names.waiting, MAX_REQUESTS)?;
    let running = names
        .running
        .map(|n| sum(&scrape, n, MAX_REQUESTS))
        .transpose()?;
    let kv = names.kv.map(|n| fullest(&scrape, n)).transpose()?;
    Ok(Figures {
        waiting,
        running,
        kv,
    })
}

/// The parser's error in one line: its first problem.
fn describe(e: &prom_text_format_parser::ScrapeParseError) -> String {
    use prom_text_format_parser::ScrapeParseError as E;
    let text = match e {
        E::Parse(m) => m.clone(),
        E::Collect(errors) => errors.first().map_or_else(String::new, |m| {
            format!("lines {}..{}: {}", m.line_no.start, m.line_no.end, m.error)
        }),
    };
    // The parser may quote the input: one bounded line for logs.
    let text = text.replace(['\n', '\r'], " ");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Every value of the gauge `name`, each checked to be finite and in
/// `0..=max`; `Missing` when it has none.
fn values(scrape: &Scrape, name: &str, max: f64) -> Result<Vec<f64>, Refusal> {
    let mut out = Vec::new();
    for metric in scrape.metrics.iter().filter(|m| m.name == name) {
        if !matches!(metric.kind, Type::Gauge | Type::Untyped) {
            return Err(Refusal::WrongType {
                name: name.to_owned(),
                kind: metric.kind.to_string(),
            });
        }
        for sample in &metric.samples {
            if sample.value.value_type != ValueType::Sample {
                continue;
            }
            let raw: &str = &sample.value.value;
            let v = sample.value.value.as_f64();
            let bad = |why| {
                Err(Refusal::BadValue {
                    name: name.to_owned(),
                    value: raw.to_owned(),
                    why,
                })
            };
            if !v.is_finite() {
                return bad("not a finite number");
            }
            if v < 0.0 {
                return bad("negative");
            }
            if v > max {
                return bad("beyond any real server's");
            }
            out.push(v);
        }
    }
    if out.is_empty() {
        return Err(Refusal::Missing(name.to_owned()));
    }
    Ok(out)
}

fn sum(scrape: &Scrape, name: &str, max: f64) -> Result<f64, Refusal> {
    let total: f64 = values(scrape, name, max)?.iter().sum();
    if total > max {
        return Err(Refusal::BadValue {
            name: name.to_owned(),
            value: total.to_string(),
            why: "series add up beyond any real server's",
        });
    }
    Ok(total)
}

/// A KV-cache fill is a share: 0..=1, the fullest series'.
fn fullest(scrape: &Scrape, name: &str) -> Result<f64, Refusal> {
    Ok(values(scrape, name, 1.0)?.into_iter().fold(0.0, f64::max))
}

#[cfg(test)]
mod tests;
