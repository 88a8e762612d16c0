//! The source line of every field path in a YAML document.
//!
//! serde gives a location only for errors it raises itself; the semantic
//! checks run on the typed `Config` afterwards, so this index maps their
//! field paths (`services[1].policy.ring_size`) back to lines.
//!
//! Why a second parser (saphyr-parser here, serde_norway for the types):
//! one parser with spans was looked at. `serde-saphyr` 2.2 (rust-version
//! 1.89, so within the pinned 1.95) records the location of every field
//! path, but hands that map (`PathMap`) only to validations written for
//! its `garde` or `validator` integrations; otherwise a location comes only
//! with `Spanned<T>`, which would wrap every field of the config types
//! that the rest of the agent reads. The checks in `validate.rs` are plain
//! functions that report every problem at once with its path, warnings
//! among them, so taking one parser would mean rewriting them for garde
//! (or spanning every field). And it has no `Value` to read each part
//! from again: it deserializes from the event stream and stops at the
//! file's first type error, where `parse_on` reports the first of `node`,
//! of each service and of each backend together
//! (`type_errors_of_every_part_are_reported_together`). So the two stay:
//! this walk of parser events, about 150 lines, does the one job the typed
//! parse cannot.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span, StrInput};

#[derive(Debug, Default)]
pub(super) struct LineIndex {
    lines: HashMap<String, usize>,
    /// Keys given twice in one mapping: path and line of the repeat.
    duplicates: Vec<(String, usize)>,
    /// Line where each document starts.
    documents: Vec<usize>,
}

impl LineIndex {
    /// Indexes the first document of `text`, and where later ones start.
    /// Best effort: a path this parser could not reach (past a syntax
    /// error) falls back to its nearest indexed ancestor.
    pub(super) fn build(text: &str) -> Self {
        let mut walker = Walker {
            events: Parser::new_from_str(text),
            lines: HashMap::new(),
            duplicates: Vec::new(),
            documents: Vec::new(),
        };
        // A parse error here only leaves the index partial (see `line`).
        if walker.stream().is_some() {
            walker.later_documents();
        }
        Self {
            lines: walker.lines,
            duplicates: walker.duplicates,
            documents: walker.documents,
        }
    }

    /// Line (1-based) where document `n` (from 0) starts, if it does.
    pub(super) fn document_line(&self, n: usize) -> Option<usize> {
        self.documents.get(n).copied()
    }

    /// Keys of the first document given twice in one mapping, with the
    /// line of the repeat and of the first.
    pub(super) fn duplicates(&self) -> impl Iterator<Item = (&str, usize, usize)> {
        self.duplicates
            .iter()
            .map(|(path, line)| (path.as_str(), *line, self.line(path)))
    }

    /// Line (1-based) of `path`, or of its closest ancestor that exists in
    /// the document (a missing optional field points at its parent).
    /// Whether the text has the field at `path`.
    pub(super) fn has(&self, path: &str) -> bool {
        self.lines.contains_key(path)
    }

    pub(super) fn line(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some(&line) = self.lines.get(path) {
                return line;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return self.lines.get("").copied().unwrap_or(1),
            }
        }
    }
}

struct Walker<'i> {
    events: Parser<'i, StrInput<'i>>,
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize)>,
    documents: Vec<usize>,
}

impl<'i> Walker<'i> {
    fn next(&mut self) -> Option<(Event<'i>, Span)> {
        self.events.next()?.ok()
    }

    fn stream(&mut self) -> Option<()> {
        loop {
            let (event, start) = self.next()?;
            match event {
                Event::StreamEnd => return Some(()),
                Event::DocumentStart(_) => {
                    self.documents.push(start.start.line());
                    let (event, span) = self.next()?;
                    return self.node(String::new(), event, span);
                }
                _ => {}
            }
        }
    }

    /// Records where the documents after the first start.
    fn later_documents(&mut self) {
        while let Some((event, span)) = self.next() {
            match event {
                Event::StreamEnd => return,
                Event::DocumentStart(_) => self.documents.push(span.start.line()),
                _ => {}
            }
        }
    }

    fn node(&mut self, path: String, event: Event<'i>, span: Span) -> Option<()> {
        // A mapping value is already indexed at its key's line, which is the
        // line a reader looks for (`policy:` rather than its first child).
        self.lines.entry(path.clone()).or_insert(span.start.line());
        match event {
            Event::MappingStart(..) => loop {
                let (key, key_span) = self.next()?;
                let child = match key {
                    Event::MappingEnd => return Some(()),
                    Event::Scalar(ref text, ..) => join(&path, text),
                    complex => {
                        let child = join(&path, "?");
                        self.node(child.clone(), complex, key_span)?;
                        child
                    }
                };
                if self.lines.contains_key(&child) && !child.ends_with('?') {
                    self.duplicates.push((child.clone(), key_span.start.line()));
                } else {
                    self.lines.insert(child.clone(), key_span.start.line());
                }
                let (value, value_span) = self.next()?;
                self.node(child, value, value_span)?;
            },
            Event::SequenceStart(..) => {
                for index in 0.. {
                    let (item, item_span) = self.next()?;
                    if matches!(item, Event::SequenceEnd) {
                        break;
                    }
                    self.node(format!("{path}[{index}]"), item, item_span)?;
                }
                Some(())
            }
            _ => Some(()),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
node:
  interfaces: [eth0, eth1]
  snat_ports: {min: 1, max: 2}
services:
  - name: chat
    policy:
      ring_size: 7

  - name: fraud
    backends:
      - a
      - b
";

    #[test]
    fn maps_paths_to_lines() {
        let index = LineIndex::build(DOC);
        assert_eq!(index.line("node"), 1);
        assert_eq!(index.line("node.interfaces[1]"), 2);
        assert_eq!(index.line("node.snat_ports.max"), 3);
        assert_eq!(index.line("services"), 4);
        assert_eq!(index.line("services[0]"), 5);
        assert_eq!(index.line("services[0].policy"), 6);
        assert_eq!(index.line("services[0].policy.ring_size"), 7);
        assert_eq!(index.line("services[1].name"), 9);
        assert_eq!(index.line("services[1].backends[1]"), 12);
    }

    #[test]
    fn missing_paths_fall_back_to_ancestors() {
        let index = LineIndex::build(DOC);
        assert_eq!(index.line("services[0].policy.standby_share"), 6);
        assert_eq!(index.line("services[1].probe.model"), 9);
        assert_eq!(index.line("backends"), 1);
        assert_eq!(LineIndex::build("").line("node"), 1);
    }
}
