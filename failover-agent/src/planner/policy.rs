//! The sovereignty policy: which backends a service may ever reach. It is
//! applied before any health or tier logic, so no later rule (spill, panic
//! fail-open, override) can bring back a backend it excluded.

use std::{collections::BTreeMap, fmt};

use crate::config::{Backend, Policy, Service};

/// Why a backend in a service's pool may not serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// The pool names a backend the config does not define.
    Undefined,
    Jurisdiction(String),
    Region(String),
    Label {
        key: String,
        want: String,
        have: Option<String>,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Undefined => write!(f, "not defined"),
            Self::Jurisdiction(j) => write!(f, "jurisdiction {j} not allowed"),
            Self::Region(r) => write!(f, "region {r} not allowed"),
            Self::Label {
                key,
                want,
                have: None,
            } => write!(f, "label {key}={want} missing"),
            Self::Label {
                key,
                want,
                have: Some(have),
            } => write!(f, "label {key}={have}, needs {want}"),
        }
    }
}

/// The first rule a backend breaks, or `None` when the policy allows it.
#[must_use]
pub fn exclusion(policy: &Policy, backend: &Backend) -> Option<Exclusion> {
    if !policy.allowed_jurisdictions.is_empty()
        && !policy.allowed_jurisdictions.contains(&backend.jurisdiction)
    {
        return Some(Exclusion::Jurisdiction(backend.jurisdiction.clone()));
    }
    if !policy.allowed_regions.is_empty() && !policy.allowed_regions.contains(&backend.region) {
        return Some(Exclusion::Region(backend.region.clone()));
    }
    for (key, want) in &policy.required_labels {
        let have = backend.labels.get(key);
        if have != Some(want) {
            return Some(Exclusion::Label {
                key: key.clone(),
                want: want.clone(),
                have: have.cloned(),
            });
        }
    }
    None
}

/// A service's pool split by the policy, in pool order, without duplicates.
#[derive(Clone, Debug, Default)]
pub struct Split<'a> {
    pub allowed: Vec<&'a Backend>,
    pub excluded: Vec<(String, Exclusion)>,
}

#[must_use]
pub fn split<'a>(service: &Service, by_name: &BTreeMap<&str, &'a Backend>) -> Split<'a> {
    let mut out = Split::default();
    let mut seen = std::collections::BTreeSet::new();
    for name in &service.backends {
        if !seen.insert(name.as_str()) {
            continue;
        }
        match by_name.get(name.as_str()) {
            None => out.excluded.push((name.clone(), Exclusion::Undefined)),
            Some(b) => match exclusion(&service.policy, b) {
                None => out.allowed.push(b),
                Some(why) => out.excluded.push((name.clone(), why)),
            },
        }
    }
    out
}

/// "jurisdiction in [EU], labels {gpu=h100}" or "no restriction".
#[must_use]
pub fn describe(policy: &Policy) -> String {
    let mut parts = Vec::new();
    if !policy.allowed_jurisdictions.is_empty() {
        parts.push(format!(
            "jurisdiction in [{}]",
            policy.allowed_jurisdictions.join(", ")
        ));
    }
    if !policy.allowed_regions.is_empty() {
        parts.push(format!("region in [{}]", policy.allowed_regions.join(", ")));
    }
    if !policy.required_labels.is_empty() {
        let labels: Vec<String> = policy
            .required_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("labels {{{}}}", labels.join(", ")));
    }
    if parts.is_empty() {
        "no restriction".to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(jurisdiction: &str, region: &str, labels: &[(&str, &str)]) -> Backend {
        crate::planner::tests::be("b", jurisdiction, region, 0, 1, labels)
    }

    fn policy(j: &[&str], r: &[&str], l: &[(&str, &str)]) -> Policy {
        Policy {
            allowed_jurisdictions: j.iter().map(|s| (*s).into()).collect(),
            allowed_regions: r.iter().map(|s| (*s).into()).collect(),
            required_labels: l.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..Policy::default()
        }
    }

    #[test]
    fn each_rule_excludes() {
        let eu = backend("EU", "eu-west-1", &[("gpu", "h100")]);
        let cases: &[(Policy, Option<Exclusion>)] = &[
            (policy(&[], &[], &[]), None),
            (policy(&["EU"], &[], &[]), None),
            (
                policy(&["EU", "CH"], &["eu-west-1"], &[("gpu", "h100")]),
                None,
            ),
            (
                policy(&["US"], &[], &[]),
                Some(Exclusion::Jurisdiction("EU".into())),
            ),
            (
                policy(&[], &["eu-central-1"], &[]),
                Some(Exclusion::Region("eu-west-1".into())),
            ),
            (
                policy(&[], &[], &[("gpu", "a100")]),
                Some(Exclusion::Label {
                    key: "gpu".into(),
                    want: "a100".into(),
                    have: Some("h100".into()),
                }),
            ),
            (
                policy(&[], &[], &[("pci", "yes")]),
                Some(Exclusion::Label {
                    key: "pci".into(),
                    want: "yes".into(),
                    have: None,
                }),
            ),
        ];
        for (p, want) in cases {
            assert_eq!(&exclusion(p, &eu), want, "{p:?}");
        }
    }

    #[test]
    fn agrees_with_config_admits() {
        let backends = [
            backend("EU", "eu-west-1", &[("gpu", "h100")]),
            backend("US", "us-east-1", &[]),
            backend("EU", "us-east-1", &[("gpu", "a100")]),
        ];
        let policies = [
            policy(&[], &[], &[]),
            policy(&["EU"], &[], &[]),
            policy(&[], &["us-east-1"], &[]),
            policy(&[], &[], &[("gpu", "h100")]),
            policy(&["EU"], &["us-east-1"], &[("gpu", "a100")]),
        ];
        for p in &policies {
            for b in &backends {
                assert_eq!(exclusion(p, b).is_none(), p.admits(b), "{p:?} {b:?}");
            }
        }
    }

    #[test]
    fn jurisdiction_match_is_exact() {
        // "eu" is not "EU": a policy never matches by accident.
        let b = backend("eu", "x", &[]);
        assert!(exclusion(&policy(&["EU"], &[], &[]), &b).is_some());
    }

    #[test]
    fn describes_policies() {
        assert_eq!(describe(&policy(&[], &[], &[])), "no restriction");
        assert_eq!(
            describe(&policy(&["EU"], &["r1"], &[("gpu", "h100")])),
            "jurisdiction in [EU], region in [r1], labels {gpu=h100}"
        );
        assert_eq!(
            Exclusion::Label {
                key: "a".into(),
                want: "b".into(),
                have: None
            }
            .to_string(),
            "label a=b missing"
        );
    }
}
