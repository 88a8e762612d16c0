use std::path::{Path, PathBuf};

use super::*;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

/// `(line, field)` of every error, in order.
fn located(error: &ConfigError) -> Vec<(usize, &str)> {
    error
        .errors()
        .iter()
        .map(|e| (e.line, e.field.as_str()))
        .collect()
}

fn parse_err(text: &str) -> ConfigError {
    parse(text, "test.yaml").expect_err("config should be refused")
}

#[test]
fn every_example_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            if let Err(error) = load(&path) {
                panic!("{} does not validate:\n{error}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example configs, found {seen}");
}

#[test]
fn two_clouds_example_has_the_documented_shape() {
    let config = load(&examples_dir().join("two-clouds.yaml")).unwrap();
    assert_eq!(config.node.interfaces, ["eth0", "eth1"]);
    assert_eq!(config.node.snat4(), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(config.node.hash_seed, 0x5eed);

    let chat = config.service("chat").unwrap();
    assert_eq!(chat.vip, Ipv4Addr::new(192, 0, 2, 10));
    assert_eq!((chat.port, chat.protocol), (80, Protocol::Tcp));
    let ProbeKind::Inference(inference) = &chat.probe.kind else {
        panic!("chat has an inference probe: {:?}", chat.probe.kind);
    };
    assert_eq!(inference.ttft_budget, Some(Duration::from_millis(800)));
    let load = chat.probe.load.as_ref().expect("chat's load facet");
    assert_eq!(
        (load.profile, load.min_change, load.rebuild_interval),
        (LoadProfile::Vllm, 0.1, Duration::from_secs(2))
    );
    assert_eq!(
        (
            chat.probe.hold_down,
            chat.probe.hold_down_max,
            chat.probe.hold_down_decay
        ),
        (
            Duration::from_secs(2),
            Duration::from_secs(120),
            Duration::from_secs(60)
        )
    );
    assert_eq!(chat.policy.panic, PanicMode::FailOpen);
    let tiers: Vec<(String, u8)> = chat
        .backends
        .iter()
        .map(|name| {
            let backend = config.backend(name).unwrap();
            (backend.cloud.clone(), backend.tier)
        })
        .collect();
    assert!(tiers.iter().all(|(cloud, tier)| {
        (cloud == "cloud-a" && *tier == 0) || (cloud == "cloud-b" && *tier == 1)
    }));

    // The EU-only policy must matter: the pool holds a US backend too.
    let fraud = config.service("fraud").unwrap();
    let admitted: Vec<&str> = fraud
        .backends
        .iter()
        .filter(|name| fraud.policy.admits(config.backend(name).unwrap()))
        .map(String::as_str)
        .collect();
    assert_eq!(admitted, ["eu-fraud-1", "eu-fraud-2"]);
    assert_eq!(fraud.backends.len(), 3);
    assert!(fraud.policy.is_restricted());

    let embed = config.service("embed").unwrap();
    assert_eq!(embed.protocol, Protocol::Udp);
    assert_eq!(embed.policy.on_backend_down, OnBackendDown::Reselect);
}

#[test]
fn examples_use_only_documentation_addresses() {
    let documentation = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113))
        }
        IpAddr::V6(ip) => ip.segments()[..2] == [0x2001, 0x0db8],
    };
    for name in ["minimal.yaml", "two-clouds.yaml"] {
        let config = load(&examples_dir().join(name)).unwrap();
        for &snat in &config.node.snat_addresses {
            assert!(documentation(snat), "{name}");
        }
        for service in &config.services {
            for vip in service.vips() {
                assert!(documentation(vip), "{name}: {}", service.name);
            }
        }
        for backend in &config.backends {
            assert!(documentation(backend.address), "{name}: {}", backend.name);
        }
    }
}

#[test]
fn minimal_example_takes_defaults() {
    let config = load(&examples_dir().join("minimal.yaml")).unwrap();
    assert_eq!(config.node.xdp_mode, XdpMode::Auto);
    assert_eq!(config.node.pin_path, Path::new("/sys/fs/bpf/failover"));
    let web = &config.services[0];
    assert_eq!(web.policy, Policy::default());
    assert_eq!(web.policy.ring_size, failover_common::RING_DEFAULT);
    assert_eq!(web.probe.interval, Duration::from_millis(100));
    assert_eq!((web.probe.rise, web.probe.fall), (2, 2));
    assert!(web.probe.passive);
    assert_eq!(config.backends[0].weight, 100);
    assert_eq!(config.backends[0].tier, 0);
}

#[test]
fn semantic_errors_are_all_reported_with_field_and_line() {
    let error = load(&fixture("semantic.yaml")).unwrap_err();
    assert_eq!(
        located(&error),
        [
            (3, "node.interfaces"),
            (5, "node.snat_ports.min"),
            (11, "services[0].backends[1]"),
            (12, "services[0].probe.model"),
            (14, "services[0].probe.timeout"),
            (15, "services[0].probe.rise"),
            (17, "services[0].policy.overprovisioning"),
            (18, "services[0].policy.standby_share"),
            (19, "services[0].policy.ring_size"),
            (20, "services[1].name"),
            (21, "services[1].vip"),
            (25, "services[1].probe"),
            (27, "services[1].probe.path"),
            (28, "services[1].policy"),
            (37, "backends[0].weight"),
            (44, "backends[2].name"),
        ]
    );
    // Each marked line of the fixture is reported, and nothing else.
    let text = std::fs::read_to_string(fixture("semantic.yaml")).unwrap();
    let marked: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains("# <-"))
        .map(|(i, _)| i + 1)
        .collect();
    let reported: Vec<usize> = error.errors().iter().map(|e| e.line).collect();
    assert_eq!(marked, reported);

    let shown = error.to_string();
    let origin = fixture("semantic.yaml").display().to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 16);
    assert_eq!(
        lines[2],
        format!(
            "{origin}:11: services[0].backends[1]: unknown backend \"ghost\" (not defined under backends)"
        )
    );
    assert_eq!(
        lines[9],
        format!(
            "{origin}:20: services[1].name: duplicate service name \"chat\" (first at services[0])"
        )
    );
    assert_eq!(
        lines[10],
        format!(
            "{origin}:21: services[1].vip: 192.0.2.10:80/tcp is already served by service \"chat\" (services[0].vip)"
        )
    );
    assert!(
        lines[11].contains(
            "services[1].probe: backend \"a1\" is also in service \"chat\" (services[0]), whose probe differs"
        ),
        "{}",
        lines[11]
    );
    assert!(lines[13].contains("services[1].policy: sovereignty policy (allowed_jurisdictions [CH]) admits none of the service's backends (a1, us1)"), "{}", lines[13]);
}

#[test]
fn bad_address_names_field_value_and_line() {
    let error = load(&fixture("bad-address.yaml")).unwrap_err();
    let origin = fixture("bad-address.yaml").display().to_string();
    assert_eq!(located(&error), [(7, "services[0].vip")]);
    assert_eq!(
        error.to_string(),
        format!("{origin}:7: services[0].vip: invalid IP address \"1.2.3\"")
    );
    let text = std::fs::read_to_string(fixture("bad-address.yaml")).unwrap();
    for vip in ["10", "192.0.2.300", "\"\"", "[192.0.2.1]"] {
        let error = parse_err(&text.replace("1.2.3", vip));
        assert_eq!(located(&error), [(7, "services[0].vip")], "{error}");
    }
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let error = load(&fixture("unknown-field.yaml")).unwrap_err();
    assert_eq!(
        located(&error),
        [(13, "services[0].policy.overprovisoning")]
    );
    let message = &error.errors()[0].message;
    assert!(
        message.starts_with("unknown field `overprovisoning`, expected one of"),
        "{message}"
    );
}

#[test]
fn syntax_error_has_line() {
    let error = load(&fixture("syntax.yaml")).unwrap_err();
    let [only] = error.errors() else {
        panic!("one error expected: {error}");
    };
    assert_eq!(only.field, "node.interfaces");
    assert_eq!(only.line, 3);
    assert!(
        only.message.contains("while parsing a flow sequence"),
        "{}",
        only.message
    );
    // It says why nothing else is reported.
    assert!(
        only.message.ends_with(
            "(YAML syntax error: the parser cannot go on past it, so the rest of the file was not checked)"
        ),
        "{}",
        only.message
    );
    assert!(
        !only.message.contains(" at line 3 column"),
        "{}",
        only.message
    );
}

#[test]
fn type_errors_name_the_nested_field() {
    let base = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
    let cases = [
        (
            "protocol: tcp",
            "protocol: sctp",
            "services[0].protocol",
            "unknown variant `sctp`",
        ),
        (
            "kind: tcp",
            "kind: tcp\n      interval: 5x",
            "services[0].probe.interval",
            "expected a duration",
        ),
        (
            "max: 32767",
            "max: 99999",
            "node.snat_ports.max",
            "expected u16",
        ),
        (
            "port: 8080\n    cloud: onprem\n    region: dc-1\n    jurisdiction: EU\n  - name: web-2",
            "port: 8080\n    region: dc-1\n    jurisdiction: EU\n  - name: web-2",
            "backends[0]",
            "missing field `cloud`",
        ),
    ];
    for (from, to, field, needle) in cases {
        assert!(base.contains(from), "{from}");
        let text = base.replacen(from, to, 1);
        let error = parse_err(&text);
        let [only] = error.errors() else {
            panic!("one error expected: {error}");
        };
        assert_eq!(only.field, field, "{error}");
        assert!(only.message.contains(needle), "{error}");
        let expected_line = text
            .lines()
            .position(|line| line.contains(to.lines().last().unwrap().trim()))
            .unwrap()
            + 1;
        if needle.starts_with("missing") {
            // Reported at the mapping that lacks the field.
            assert!(only.line <= expected_line, "{error}");
        } else {
            assert_eq!(only.line, expected_line, "{error}");
        }
    }
}

#[test]
fn root_level_errors() {
    // Every missing field at once.
    let error = parse_err("");
    assert_eq!(
        error.to_string(),
        "test.yaml:1: missing field `node`\n\
         test.yaml:1: missing field `services`\n\
         test.yaml:1: missing field `backends`"
    );
    let error = parse_err("nodes: {}\nservices: []\nbackends: []\n");
    assert_eq!(
        located(&error),
        [(1, "nodes"), (1, "")],
        "the unknown field and the missing one: {error}"
    );
    assert!(
        error.errors()[0]
            .message
            .starts_with("unknown field `nodes`, expected one of `node`, `services`, `backends`"),
        "{error}"
    );
    let error = parse_err("- 1\n- 2\n");
    assert_eq!(error.errors()[0].field, "");
    assert!(
        error
            .to_string()
            .starts_with("test.yaml:1: invalid type: sequence"),
        "{error}"
    );
}

#[test]
fn read_error_names_the_file() {
    let error = load(Path::new("/nonexistent/failover.yaml")).unwrap_err();
    assert!(error.errors().is_empty());
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/failover.yaml: cannot read config:"),
        "{error}"
    );
}

fn minimal() -> Config {
    load(&examples_dir().join("minimal.yaml")).unwrap()
}

/// Re-serializes `config` and returns the fields of its errors, which
/// checks validation of values that are awkward to write by hand.
fn fields_of(config: &Config) -> Vec<String> {
    let text = serde_norway::to_string(config).unwrap();
    match parse(&text, "generated.yaml") {
        Ok(_) => Vec::new(),
        Err(error) => error.errors().iter().map(|e| e.field.clone()).collect(),
    }
}

#[test]
fn path_mtu_limits() {
    for (mtu, ok) in [
        (575, false),
        (576, true),
        (1400, true),
        (9216, true),
        (9217, false),
    ] {
        let mut config = minimal();
        config.backends[0].path_mtu = Some(mtu);
        let fields = fields_of(&config);
        if ok {
            assert!(fields.is_empty(), "{mtu}: {fields:?}");
        } else {
            assert_eq!(fields, ["backends[0].path_mtu"], "{mtu}");
        }
    }
}

#[test]
fn value_limits() {
    let mut config = minimal();
    assert!(fields_of(&config).is_empty());

    config.backends[0].weight = MAX_WEIGHT;
    config.services[0].policy.standby_share = 0.99;
    config.services[0].policy.ring_size = 3;
    config.services[0].policy.overprovisioning = 1.0;
    config.node.snat_ports = PortRange { min: 1, max: 1 };
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));

    config.backends[1].weight = MAX_WEIGHT + 1;
    config.services[0].policy.standby_share = -0.1;
    config.services[0].policy.overprovisioning = f64::NAN;
    config.services[0].probe.fall = 0;
    config.services[0].probe.interval = Duration::ZERO;
    config.node.snat_ports = PortRange {
        min: 2000,
        max: 1000,
    };
    let mut fields = fields_of(&config);
    fields.sort();
    assert_eq!(
        fields,
        [
            "backends[1].weight",
            "node.snat_ports.max",
            "services[0].policy.overprovisioning",
            "services[0].policy.standby_share",
            "services[0].probe.fall",
            "services[0].probe.interval",
        ]
    );
}

#[test]
fn hold_down_limits() {
    let secs = Duration::from_secs;
    let mut config = minimal();
    let probe = &config.services[0].probe;
    assert_eq!(
        (probe.hold_down, probe.hold_down_max, probe.hold_down_decay),
        (secs(1), secs(60), secs(30)),
        "defaults"
    );
    let probe = &mut config.services[0].probe;
    probe.hold_down = Duration::ZERO; // damping off
    probe.hold_down_max = secs(3600);
    probe.hold_down_decay = secs(3600);
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));
    let probe = &mut config.services[0].probe;
    probe.hold_down = secs(60);
    probe.hold_down_max = secs(59);
    probe.hold_down_decay = Duration::ZERO;
    assert_eq!(
        fields_of(&config),
        [
            "services[0].probe.hold_down_max",
            "services[0].probe.hold_down_decay"
        ]
    );
    let probe = &mut config.services[0].probe;
    probe.hold_down_max = secs(3601);
    probe.hold_down_decay = secs(3601);
    assert_eq!(
        fields_of(&config),
        [
            "services[0].probe.hold_down_max",
            "services[0].probe.hold_down_decay"
        ]
    );

    // As an operator sees them: file, line, field, message.
    let base = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
    let text = base.replacen(
        "kind: tcp",
        "kind: tcp\n      hold_down: 2m\n      hold_down_max: 90s\n      hold_down_decay: 0s",
        1,
    );
    let lines: Vec<String> = parse_err(&text)
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            "test.yaml:17: services[0].probe.hold_down_max: hold_down_max 1m 30s is below hold_down 2m",
            "test.yaml:18: services[0].probe.hold_down_decay: hold_down_decay 0s must be greater than 0 and at most 1h",
        ]
    );
}

#[test]
fn ring_size_limits() {
    let mut config = minimal();
    for (ring, ok) in [
        (2, true),
        (1, false),
        (65_537, true),
        (65_539, false),
        (9, false),
    ] {
        config.services[0].policy.ring_size = ring;
        assert_eq!(fields_of(&config).is_empty(), ok, "ring_size {ring}");
    }
    // Smaller than the pool: Maglev needs a slot per backend at least.
    config.services[0].policy.ring_size = 2;
    config.backends.push(Backend {
        name: "web-3".into(),
        address: Ipv4Addr::new(203, 0, 113, 13).into(),
        ..config.backends[0].clone()
    });
    config.services[0].backends.push("web-3".into());
    assert_eq!(fields_of(&config), ["services[0].policy.ring_size"]);
}

/// The errors of minimal.yaml with its `kind: tcp` line replaced by `probe`
/// (lines that follow at 15).
fn probe_errors(probe: &str) -> Vec<(usize, String, String)> {
    let text = minimal_text().replacen("kind: tcp", probe, 1);
    parse_err(&text)
        .errors()
        .iter()
        .map(|e| (e.line, e.field.clone(), e.message.clone()))
        .collect()
}

#[test]
fn probe_fields_must_fit_the_kind() {
    // A field of another kind is an unknown field of this kind, named
    // with its line.
    for (kind, field, value) in [
        ("tcp", "tls", "true"),
        ("tcp", "expect_status", "200"),
        ("tcp", "model", "m"),
        ("http", "model", "m"),
        ("grpc", "path", "/health"),
        ("udp", "tls", "true"),
    ] {
        // A udp probe needs its payload too.
        let (payload, line) = match kind {
            "udp" => ("\n      payload: ping", 17),
            _ => ("", 16),
        };
        let errors = probe_errors(&format!("kind: {kind}{payload}\n      {field}: {value}"));
        let [(at, path, message)] = &errors[..] else {
            panic!("one error expected: {errors:?}");
        };
        assert_eq!(
            (*at, path.as_str()),
            (line, format!("services[0].probe.{field}").as_str()),
            "{kind}: {message}"
        );
        assert!(
            message.starts_with(&format!("unknown field `{field}`")),
            "{message}"
        );
    }
    let errors = probe_errors(
        "kind: http\n      expect_status: 200\n      body_contains: x\n      model: m",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (18, "services[0].probe.model")
    );
    let shared = "`kind`, `interval`, `timeout`, `rise`, `fall`, `min_dwell`, `hold_down`, \
                  `hold_down_max`, `hold_down_decay`, `passive`, `load`";
    assert_eq!(
        errors[0].2,
        format!(
            "unknown field `model`, expected one of {shared}, `path`, `tls`, `expect_status`, \
             `body_contains`"
        )
    );
    // A misspelt shared field: every field the probe may have is listed.
    let errors = probe_errors("kind: tcp\n      intervall: 1s");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (16, "services[0].probe.intervall")
    );
    assert_eq!(
        errors[0].2,
        format!("unknown field `intervall`, expected one of {shared}")
    );
    let errors = probe_errors("kind: grpc\n      tsl: true");
    assert_eq!(
        errors[0].2,
        format!("unknown field `tsl`, expected one of {shared}, `tls`, `grpc_service`")
    );
    // A field of the kind with a value of the wrong type, and a kind that
    // does not exist.
    let errors = probe_errors("kind: http\n      tls: maybe");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (16, "services[0].probe.tls"),
        "{errors:?}"
    );
    let errors = probe_errors("kind: htp");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (15, "services[0].probe.kind"),
        "{errors:?}"
    );
    assert!(
        errors[0]
            .2
            .starts_with("unknown variant `htp`, expected one of `tcp`, `http`"),
        "{errors:?}"
    );
    let errors = probe_errors("interval: 1s");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (14, "services[0].probe"),
        "{errors:?}"
    );
    assert_eq!(errors[0].2, "missing field `kind`");

    // The checks of each kind's values.
    let mut config = minimal();
    config.services[0].probe.kind = ProbeKind::Inference(InferenceCheck {
        model: Some("m".into()),
        tls: true,
        ttft_budget: Some(Duration::ZERO),
        path: Some("/openai".into()),
        ..InferenceCheck::default()
    });
    assert_eq!(fields_of(&config), ["services[0].probe.ttft_budget"]);

    config.services[0].probe.kind = ProbeKind::Http(HttpCheck {
        tls: true,
        expect_status: Some(99),
        path: Some("/openai".into()),
        ..HttpCheck::default()
    });
    assert_eq!(fields_of(&config), ["services[0].probe.expect_status"]);

    config.services[0].probe.kind = ProbeKind::Grpc(GrpcCheck {
        tls: true,
        grpc_service: Some(String::new()),
    });
    assert!(fields_of(&config).is_empty());
}

#[test]
fn sovereignty_by_region_and_labels() {
    let mut config = minimal();
    config.backends[1].region = "dc-2".into();
    config.backends[1]
        .labels
        .insert("tier".into(), "gold".into());
    let policy = &mut config.services[0].policy;
    policy.allowed_regions = vec!["dc-2".into()];
    assert!(fields_of(&config).is_empty());
    assert!(!config.services[0].policy.admits(&config.backends[0]));
    assert!(config.services[0].policy.admits(&config.backends[1]));

    config.services[0]
        .policy
        .required_labels
        .insert("tier".into(), "silver".into());
    assert_eq!(fields_of(&config), ["services[0].policy"]);
    config.services[0]
        .policy
        .required_labels
        .insert("tier".into(), "gold".into());
    assert!(fields_of(&config).is_empty());
}

#[test]
fn names_and_addresses() {
    let mut config = minimal();
    config.services[0].name = "has space".into();
    config.backends[0].address = Ipv4Addr::UNSPECIFIED.into();
    config.backends[1].port = 0;
    config.backends[1].jurisdiction = " ".into();
    config.node.interfaces = vec!["eth0".into(), "eth0".into(), "a-very-long-ifname".into()];
    config.node.snat_addresses = vec![Ipv4Addr::BROADCAST.into()];
    let mut fields = fields_of(&config);
    fields.sort();
    assert_eq!(
        fields,
        [
            "backends[0].address",
            "backends[1].jurisdiction",
            "backends[1].port",
            "node.interfaces[1]",
            "node.interfaces[2]",
            "node.snat_addresses[0]",
            "services[0].name",
        ]
    );
}

#[test]
fn table_limits() {
    let mut config = minimal();
    let template = config.services[0].clone();
    config.services = (0..=failover_common::MAX_SERVICES)
        .map(|i| Service {
            name: format!("s{i}"),
            port: 1000 + u16::try_from(i).unwrap(),
            ..template.clone()
        })
        .collect();
    assert_eq!(fields_of(&config), ["services"]);
}

#[test]
fn diff_reports_changes_by_name() {
    let old = load(&examples_dir().join("two-clouds.yaml")).unwrap();
    assert!(diff(&old, &old).is_empty());
    assert_eq!(diff(&old, &old).to_string(), "no changes");

    let mut new = old.clone();
    new.services.retain(|service| service.name != "embed");
    new.services[0].policy.standby_share = 0.1;
    new.services.push(Service {
        name: "rerank".into(),
        port: 8080,
        ..old.services[0].clone()
    });
    new.backends[0].weight = 10;
    new.backends[0].tier = 1;
    new.backends.pop();
    new.backends.push(Backend {
        name: "c1".into(),
        ..old.backends[0].clone()
    });
    new.node.snat_ports.max = 30000;

    let d = diff(&old, &new);
    assert_eq!(d.node, ["snat_ports"]);
    assert_eq!(d.services_added, ["rerank"]);
    assert_eq!(d.services_removed, ["embed"]);
    assert_eq!(
        d.services_changed,
        [ServiceChange {
            name: "chat".into(),
            fields: vec!["policy"],
        }]
    );
    assert_eq!(d.backends_added, ["c1"]);
    assert_eq!(d.backends_removed, ["us-fraud-1"]);
    assert_eq!(
        d.backends_changed,
        [BackendChange {
            name: "a1".into(),
            fields: vec!["tier", "weight"],
        }]
    );
    assert_eq!(
        d.to_string(),
        "node [snat_ports]; services +1 -1 ~1; backends +1 -1 ~1"
    );
    // Reordering alone is no change.
    let mut reordered = old.clone();
    reordered.services.reverse();
    reordered.backends.reverse();
    assert!(diff(&old, &reordered).is_empty());
}

#[test]
fn operator_floor_grace_and_state_file_defaults_and_limits() {
    let mut config = minimal();
    let policy = &config.services[0].policy;
    assert_eq!(
        (policy.min_healthy, policy.slow_grace),
        (1, Duration::from_secs(30)),
        "defaults"
    );
    assert_eq!(config.node.state_file, None);
    assert_eq!(
        config.node.state_file(),
        Path::new("/var/lib/failover/failover.state.json"),
        "derived from pin_path"
    );
    config.node.pin_path = PathBuf::from("/sys/fs/bpf/edge-2");
    assert_eq!(
        config.node.state_file(),
        Path::new("/var/lib/failover/edge-2.state.json")
    );

    // Two admitted backends: a floor of 2 is the most.
    let policy = &mut config.services[0].policy;
    policy.min_healthy = 2;
    policy.slow_grace = Duration::from_secs(3600);
    config.node.state_file = Some(PathBuf::from("/srv/failover/state.json"));
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));
    assert_eq!(
        config.node.state_file(),
        Path::new("/srv/failover/state.json")
    );

    let policy = &mut config.services[0].policy;
    policy.min_healthy = 3;
    policy.slow_grace = Duration::from_secs(3601);
    config.node.state_file = Some(PathBuf::from("state.json"));
    assert_eq!(
        fields_of(&config),
        [
            "node.state_file",
            "services[0].policy.min_healthy",
            "services[0].policy.slow_grace",
        ]
    );
    config.services[0].policy.min_healthy = 0;
    assert!(fields_of(&config).contains(&"services[0].policy.min_healthy".to_owned()));

    // As an operator sees them: file, line, field, message.
    let base = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
    let text = base
        .replacen(
            "kind: tcp",
            "kind: tcp\n    policy:\n      min_healthy: 3\n      slow_grace: 2h",
            1,
        )
        .replacen(
            "snat_ports: { min: 10000, max: 32767 }",
            "snat_ports: { min: 10000, max: 32767 }\n  state_file: relative/state.json",
            1,
        );
    let lines: Vec<String> = parse_err(&text)
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            "test.yaml:7: node.state_file: relative/state.json is not an absolute file path",
            "test.yaml:18: services[0].policy.min_healthy: min_healthy 3 is more than the 2 backends the policy admits",
            "test.yaml:19: services[0].policy.slow_grace: slow_grace 2h is above the limit of 1h",
        ]
    );
}

#[test]
fn udp_probe_fields() {
    let mut config = minimal();
    config.services[0].protocol = Protocol::Udp;
    let udp = |config: &mut Config, check: UdpCheck| {
        config.services[0].probe.kind = ProbeKind::Udp(check);
        fields_of(config)
    };
    assert_eq!(
        udp(&mut config, UdpCheck::default()),
        ["services[0].probe.payload"],
        "required"
    );

    let fields = udp(
        &mut config,
        UdpCheck {
            payload: Some(Bytes::Text("ping".into())),
            expect_prefix: Some(Bytes::Hex("706f6e67".into())),
            expect: None,
        },
    );
    assert!(fields.is_empty(), "{fields:?}");

    assert_eq!(
        udp(
            &mut config,
            UdpCheck {
                payload: Some(Bytes::Hex("0g".into())),
                expect: Some(Bytes::Text("pong".into())),
                expect_prefix: Some(Bytes::Hex("706f6e67".into())),
            }
        ),
        [
            "services[0].probe.payload",
            "services[0].probe.expect_prefix",
        ]
    );

    assert_eq!(
        udp(
            &mut config,
            UdpCheck {
                payload: Some(Bytes::Text("x".repeat(MAX_UDP_PAYLOAD + 1))),
                expect_prefix: Some(Bytes::Text(String::new())),
                expect: None,
            }
        ),
        [
            "services[0].probe.payload",
            "services[0].probe.expect_prefix"
        ]
    );

    // UDP fields on another kind, and another kind's field on a udp probe.
    assert_eq!(
        probe_errors("kind: tcp\n      payload: ping\n      expect: pong")[0].1,
        "services[0].probe.payload"
    );
    assert_eq!(
        probe_errors("kind: udp\n      payload: ping\n      tls: true")[0].1,
        "services[0].probe.tls"
    );

    // As an operator sees them.
    let base = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
    let text = base.replacen(
        "kind: tcp",
        "kind: udp\n      payload: { hex: \"zz\" }\n      expect: pong\n      expect_prefix: po",
        1,
    );
    let lines: Vec<String> = parse_err(&text)
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            "test.yaml:16: services[0].probe.payload: payload hex must be pairs of hex digits (0-9, a-f), nothing else",
            "test.yaml:18: services[0].probe.expect_prefix: set expect (the whole answer) or expect_prefix (its start), not both",
        ]
    );
}

#[test]
fn a_backend_is_probed_by_one_probe() {
    let mut config = minimal();
    let other = Service {
        name: "web-udp".into(),
        protocol: Protocol::Udp,
        ..config.services[0].clone()
    };
    config.services.push(other);
    assert!(fields_of(&config).is_empty(), "the same probe: fine");
    config.services[1].probe.interval = Duration::from_millis(500);
    assert_eq!(fields_of(&config), ["services[1].probe"]);
}

#[test]
fn timeouts_default_and_bounds_name_the_field() {
    let mut config = minimal();
    let t = config.services[0].timeouts;
    assert_eq!(
        (t.tcp_half_open, t.tcp_idle, t.udp_idle),
        (
            Duration::from_secs(10),
            Duration::from_secs(3600),
            Duration::from_secs(30)
        )
    );
    config.services[0].timeouts.tcp_half_open = Duration::from_millis(10);
    config.services[0].timeouts.udp_idle = Duration::from_secs(30 * 24 * 3600);
    assert_eq!(
        fields_of(&config),
        [
            "services[0].timeouts.tcp_half_open",
            "services[0].timeouts.udp_idle"
        ]
    );
}

#[test]
fn flow_capacity_defaults_and_bounds() {
    let mut config = minimal();
    assert_eq!(config.node.flow_capacity, failover_common::FLOWS_MAX);
    config.node.flow_capacity = 100;
    assert_eq!(fields_of(&config), ["node.flow_capacity"]);
    config.node.flow_capacity = 1 << 23;
    assert_eq!(fields_of(&config), ["node.flow_capacity"]);
}

/// Parses `text` with the kernel's default ephemeral range, whatever the
/// host running the test says.
fn checked(text: &str) -> Result<Loaded, ConfigError> {
    parse_on(text, "test.yaml", &Host::defaults())
}

fn minimal_text() -> String {
    std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap()
}

#[test]
fn examples_validate_without_warnings() {
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        let loaded = parse_on(&text, &name, &Host::defaults()).unwrap();
        assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
    }
    let two = load(&examples_dir().join("two-clouds.yaml")).unwrap();
    let chat = &two.service("chat").unwrap().probe;
    let ProbeKind::Inference(inference) = &chat.kind else {
        panic!("chat has an inference probe: {:?}", chat.kind);
    };
    assert_eq!(
        (inference.path.as_deref(), chat.degraded_weight()),
        (None, 0.25)
    );
}

#[test]
fn type_errors_of_every_part_are_reported_together() {
    let text = minimal_text()
        .replacen("protocol: tcp", "protocol: sctp", 1)
        .replacen("snat_address: 198.51.100.1", "snat_address: 198.51.100", 1)
        .replacen("port: 8080", "port: 80800", 1)
        .replacen(
            "jurisdiction: EU\n",
            "jurisdiction: EU\n    colour: red\n",
            1,
        )
        .replacen("port: 8080\n", "port: 8080\n    colour: red\n", 2);
    let error = checked(&text).unwrap_err();
    assert_eq!(
        located(&error),
        [
            (5, "node.snat_address"),
            (12, "services[0].protocol"),
            (20, "backends[0].port"),
            (28, "backends[1].colour"),
        ],
        "{error}"
    );
    assert_eq!(
        error.to_string().lines().collect::<Vec<_>>(),
        [
            "test.yaml:5: node.snat_address: invalid IP address \"198.51.100\"",
            "test.yaml:12: services[0].protocol: unknown variant `sctp`, expected `tcp` or `udp`",
            "test.yaml:20: backends[0].port: invalid value: integer `80800`, expected u16",
            "test.yaml:28: backends[1].colour: unknown field `colour`, expected one of `name`, `address`, `port`, `cloud`, `region`, `jurisdiction`, `tier`, `weight`, `labels`, `path_mtu`",
        ]
    );
    // A part that is no list is one error, at its line.
    let error = checked(&minimal_text().replacen(
        "backends:\n  - name: web-1",
        "backends: 3\nx:\n  - name: web-1",
        1,
    ))
    .unwrap_err();
    assert_eq!(located(&error), [(17, "backends"), (18, "x")], "{error}");
}

#[test]
fn a_second_document_is_reported_and_the_first_still_checked() {
    // The first document has a semantic error; the second is not read.
    let text = minimal_text().replacen("port: 80\n", "port: 0\n", 1) + "---\nnode: {}\n";
    let error = checked(&text).unwrap_err();
    assert_eq!(
        located(&error),
        [(11, "services[0].port"), (30, "")],
        "{error}"
    );
    assert!(
        error.errors()[1]
            .message
            .starts_with("a second YAML document: the config is the first one"),
        "{error}"
    );
    // A syntax error in the second does not hide the first's errors.
    let text = minimal_text().replacen("port: 80\n", "port: 0\n", 1) + "---\nnode: [1\n";
    let error = checked(&text).unwrap_err();
    assert_eq!(
        located(&error),
        [(11, "services[0].port"), (30, "")],
        "{error}"
    );
    assert!(
        error.errors()[1].message.contains("has a syntax error"),
        "{error}"
    );
}

#[test]
fn keys_given_twice_are_named_at_the_repeat() {
    let text = minimal_text().replacen("    port: 80\n", "    port: 80\n    port: 81\n", 1);
    let error = checked(&text).unwrap_err();
    assert_eq!(located(&error), [(12, "services[0].port")], "{error}");
    assert!(
        error.errors()[0]
            .message
            .starts_with("given twice in one mapping (first at line 11)"),
        "{error}"
    );
}

#[test]
fn snat_ports_in_the_ephemeral_range_are_a_warning() {
    let host = Host::defaults();
    // The examples' range, below the ephemeral one: nothing to say.
    let loaded = checked(&minimal_text()).unwrap();
    assert!(loaded.warnings.is_empty());
    // The lab's (tests/src/lab.rs) range: inside it, valid, with a warning.
    let text = minimal_text().replacen("min: 10000, max: 32767", "min: 40000, max: 40999", 1);
    let loaded = parse_on(&text, "test.yaml", &host).unwrap();
    let [w] = &loaded.warnings[..] else {
        panic!("one warning: {:?}", loaded.warnings);
    };
    assert_eq!((w.line, w.field.as_str()), (6, "node.snat_ports"));
    let shown = w.as_warning().to_string();
    assert!(
        shown.starts_with(
            "test.yaml:6: warning: node.snat_ports: snat_ports 40000-40999: 1000 ports \
             (40000-40999) are in the kernel's ephemeral range 32768-60999 (the kernel's \
             default; this host's net.ipv4.ip_local_port_range could not be read)"
        ),
        "{shown}"
    );
    // Partly inside; one port inside.
    let text = minimal_text().replacen("max: 32767", "max: 32768", 1);
    let w = &checked(&text).unwrap().warnings;
    assert!(
        w[0].message.contains(": port 32768 is in the kernel's"),
        "{w:?}"
    );
    // Reserved ports are never ephemeral: no warning.
    let reserved = Host {
        reserved_ports: vec![(32_000, 33_000), (40_000, 40_999)],
        ..Host::defaults()
    };
    let text = minimal_text().replacen("min: 10000, max: 32767", "min: 40000, max: 40999", 1);
    assert!(parse_on(&text, "t", &reserved).unwrap().warnings.is_empty());
    // Another host's range.
    let other = Host {
        ephemeral_ports: (10_000, 20_000),
        reserved_ports: Vec::new(),
        read: true,
    };
    let w = parse_on(&minimal_text(), "t", &other).unwrap().warnings;
    assert!(
        w[0].message
            .contains("range 10000-20000 (net.ipv4.ip_local_port_range on this host)"),
        "{w:?}"
    );
    // Warnings ride along with errors.
    let text = minimal_text()
        .replacen("min: 10000, max: 32767", "min: 40000, max: 40999", 1)
        .replacen("port: 80\n", "port: 0\n", 1);
    let error = checked(&text).unwrap_err();
    assert_eq!(located(&error), [(11, "services[0].port")]);
    assert_eq!(error.warnings().len(), 1);
}

#[test]
fn addresses_that_collide_are_refused_or_warned_about() {
    let mut config = minimal();
    config.node.snat_addresses = vec![config.services[0].vip];
    config.backends[0].address = config.services[0].vip;
    assert_eq!(
        fields_of(&config),
        ["node.snat_addresses[0]", "backends[0].address"]
    );
    let mut config = minimal();
    config.backends[1].address = config.node.snat_addresses[0];
    assert_eq!(fields_of(&config), ["backends[1].address"]);

    // As an operator sees them.
    let text = minimal_text()
        .replacen("snat_address: 198.51.100.1", "snat_address: 192.0.2.10", 1)
        .replacen("address: 203.0.113.11", "address: 192.0.2.10", 1)
        .replacen("address: 203.0.113.12", "address: 127.0.0.2", 1);
    let error = checked(&text).unwrap_err();
    let shown: Vec<String> = error.to_string().lines().map(str::to_owned).collect();
    assert_eq!(
        shown,
        [
            "test.yaml:5: node.snat_address: 192.0.2.10 is also the VIP of service \"web\" (services[0]): backends' replies to the NAT address would meet the VIP's handling; give the node an address of its own for SNAT",
            "test.yaml:19: backends[0].address: 192.0.2.10 is the VIP of service \"web\" (services[0]): traffic to this backend would come back to the load balancer; use the backend's own address",
        ]
    );
    // Loopback: a warning (a probe-only setup, like the probe benchmark,
    // uses it; client traffic to it is dropped).
    let [w] = error.warnings() else {
        panic!("{:?}", error.warnings());
    };
    assert_eq!((w.line, w.field.as_str()), (25, "backends[1].address"));
    assert!(
        w.message.starts_with("127.0.0.2 is a loopback address"),
        "{w}"
    );
}

#[test]
fn probe_durations_are_bounded() {
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: tcp\n      interval: 10m\n      timeout: 1000h\n      min_dwell: 2h",
        1,
    );
    let lines: Vec<String> = checked(&text)
        .unwrap_err()
        .to_string()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            "test.yaml:16: services[0].probe.interval: interval 10m must be from 1ms to 5m",
            "test.yaml:17: services[0].probe.timeout: timeout 1000h must be from 1ms to 1m",
            "test.yaml:18: services[0].probe.min_dwell: min_dwell 2h must be from 0s to 1h",
        ]
    );
    let mut config = minimal();
    let probe = &mut config.services[0].probe;
    probe.interval = Duration::from_secs(300);
    probe.timeout = Duration::from_secs(60);
    probe.min_dwell = Duration::from_secs(3600);
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));
    config.services[0].probe.interval = Duration::from_micros(999);
    assert_eq!(fields_of(&config), ["services[0].probe.interval"]);
}

/// The first service's probe as an inference probe (model `m` unless one
/// is set), to change.
fn inference(config: &mut Config) -> &mut InferenceCheck {
    let probe = &mut config.services[0].probe;
    if !matches!(probe.kind, ProbeKind::Inference(_)) {
        probe.kind = ProbeKind::Inference(InferenceCheck::default());
    }
    let ProbeKind::Inference(check) = &mut probe.kind else {
        unreachable!("set above");
    };
    check.model.get_or_insert_with(|| "m".into());
    check
}

#[test]
fn inference_ttft_budget_and_degraded_weight() {
    let mut config = minimal();
    inference(&mut config);
    assert_eq!(config.services[0].probe.degraded_weight(), 0.5, "default");
    let timeout = config.services[0].probe.timeout;
    let check = inference(&mut config);
    check.ttft_budget = Some(timeout);
    check.degraded_weight = Some(1.0);
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));
    assert_eq!(config.services[0].probe.degraded_weight(), 1.0);
    let check = inference(&mut config);
    check.ttft_budget = Some(timeout + Duration::from_millis(1));
    check.degraded_weight = Some(0.0);
    assert_eq!(
        fields_of(&config),
        [
            "services[0].probe.ttft_budget",
            "services[0].probe.degraded_weight"
        ]
    );
    for bad in [1.5, -0.1, f64::NAN] {
        inference(&mut config).degraded_weight = Some(bad);
        assert!(
            fields_of(&config).contains(&"services[0].probe.degraded_weight".to_owned()),
            "{bad}"
        );
    }
    // Only the inference probe degrades a backend.
    assert_eq!(
        probe_errors("kind: tcp\n      degraded_weight: 0.5")[0].1,
        "services[0].probe.degraded_weight"
    );
    // As an operator sees it.
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: inference\n      model: m\n      degraded_weight: 2",
        1,
    );
    assert_eq!(
        checked(&text).unwrap_err().to_string(),
        "test.yaml:17: services[0].probe.degraded_weight: degraded_weight 2 must be above 0 and at most 1 (the share of its weight a degraded backend keeps)"
    );
}

#[test]
fn an_inference_path_is_the_prefix_of_the_openai_routes() {
    let mut config = minimal();
    for (path, ok) in [
        ("/openai", true),
        ("/", true),
        ("/v1/chat/completions", false),
        ("/gw/v1/models/", false),
        ("/v1", false),
    ] {
        inference(&mut config).path = Some(path.into());
        assert_eq!(
            fields_of(&config).is_empty(),
            ok,
            "{path}: {:?}",
            fields_of(&config)
        );
    }
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: inference\n      model: m\n      path: /v1/chat/completions",
        1,
    );
    let error = checked(&text).unwrap_err();
    assert_eq!(located(&error), [(17, "services[0].probe.path")]);
    assert!(
        error.errors()[0]
            .message
            .contains("\"/v1/chat/completions\" would probe /v1/chat/completions/v1/models"),
        "{error}"
    );
}

#[test]
fn load_facet_reads_with_its_defaults() {
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: inference\n      model: m\n      load:\n        profile: vllm",
        1,
    );
    let config = parse(&text, "test.yaml").unwrap();
    let load = config.services[0].probe.load.as_ref().unwrap();
    assert_eq!(*load, LoadScrape::new(LoadProfile::Vllm));
    assert_eq!(load.path, "/metrics");
    assert_eq!(load.interval, Duration::from_secs(1));
    assert_eq!(load.rebuild_interval, Duration::from_secs(2));
    assert_eq!((load.min_change, load.min_factor), (0.1, 0.1));
    assert_eq!((load.queue_high(), load.kv_high()), (8.0, 0.9));
    let names = load.names().unwrap();
    assert_eq!(
        (names.waiting, names.running, names.kv),
        (
            "vllm:num_requests_waiting",
            Some("vllm:num_requests_running"),
            Some("vllm:kv_cache_usage_perc")
        )
    );
    // Any kind may carry it; a custom profile names its metrics.
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: tcp\n      load:\n        profile: custom\n        path: /stats\n        \
         interval: 500ms\n        min_change: 0.2\n        rebuild_interval: 5s\n        \
         queue_high: 3\n        kv_high: 0.8\n        \
         metrics: {waiting: q:waiting, running: q_running, kv: q_kv}",
        1,
    );
    let config = parse(&text, "test.yaml").unwrap();
    let load = config.services[0].probe.load.as_ref().unwrap();
    let names = load.names().unwrap();
    assert_eq!(
        (names.waiting, names.running, names.kv),
        ("q:waiting", Some("q_running"), Some("q_kv"))
    );
    assert_eq!((load.queue_high(), load.kv_high()), (3.0, 0.8));
    assert_eq!(load.interval, Duration::from_millis(500));
}

/// The first service's probe with a load facet of `profile`, to change.
fn load_of(config: &mut Config, profile: LoadProfile) -> &mut LoadScrape {
    config.services[0]
        .probe
        .load
        .get_or_insert_with(|| LoadScrape::new(profile))
}

#[test]
fn load_facet_errors_name_the_field() {
    let mut config = minimal();
    load_of(&mut config, LoadProfile::Sglang);
    assert!(fields_of(&config).is_empty(), "{:?}", fields_of(&config));
    let load = load_of(&mut config, LoadProfile::Sglang);
    load.min_change = 1.0;
    load.min_factor = 0.0;
    load.interval = Duration::from_millis(10);
    load.rebuild_interval = Duration::from_secs(3600);
    load.queue_high = Some(0.5);
    load.kv_high = Some(1.5);
    load.path = "metrics".into();
    load.metrics = Some(LoadMetrics {
        waiting: "w".into(),
        running: None,
        kv: None,
    });
    assert_eq!(
        fields_of(&config),
        [
            "services[0].probe.load.path",
            "services[0].probe.load.interval",
            "services[0].probe.load.min_change",
            "services[0].probe.load.rebuild_interval",
            "services[0].probe.load.metrics",
            "services[0].probe.load.queue_high",
            "services[0].probe.load.kv_high",
            "services[0].probe.load.min_factor",
        ]
    );
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        let mut config = minimal();
        load_of(&mut config, LoadProfile::Vllm).min_change = bad;
        assert_eq!(
            fields_of(&config),
            ["services[0].probe.load.min_change"],
            "{bad}"
        );
    }
    // Custom: names and thresholds are its own.
    let mut config = minimal();
    load_of(&mut config, LoadProfile::Custom);
    assert_eq!(fields_of(&config), ["services[0].probe.load.metrics"]);
    load_of(&mut config, LoadProfile::Custom).metrics = Some(LoadMetrics {
        waiting: "9bad".into(),
        running: Some("ok_name".into()),
        kv: Some("has space".into()),
    });
    assert_eq!(
        fields_of(&config),
        [
            // Missing thresholds sit at the facet's line, above its metrics.
            "services[0].probe.load.queue_high",
            "services[0].probe.load.kv_high",
            "services[0].probe.load.metrics.waiting",
            "services[0].probe.load.metrics.kv",
        ]
    );
    // As an operator sees them, with their lines.
    let text = minimal_text().replacen(
        "kind: tcp",
        "kind: tcp\n      load:\n        profile: vllm\n        min_change: 2",
        1,
    );
    assert_eq!(
        checked(&text).unwrap_err().to_string(),
        "test.yaml:18: services[0].probe.load.min_change: min_change 2 must be at least 0 \
         and below 1 (the relative change of the load factor that rewrites a weight)"
    );
    let errors = probe_errors("kind: tcp\n      load:\n        profile: vllm\n        queue: 3");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (18, "services[0].probe.load.queue"),
        "{errors:?}"
    );
    assert!(
        errors[0].2.starts_with("unknown field `queue`"),
        "{errors:?}"
    );
    let errors = probe_errors("kind: tcp\n      load:\n        profile: ollama");
    assert_eq!(errors[0].1, "services[0].probe.load.profile", "{errors:?}");
}

/// A config of `services` (list items) over b4 (IPv4) and b6 (IPv6), SNAT
/// on `snat` (the `node.snat_addresses` value).
fn v6_text(snat: &str, services: &str) -> String {
    format!(
        "node:
  interfaces: [eth0]
  snat_addresses: {snat}
  snat_ports: {{ min: 10000, max: 32767 }}
services:
{services}backends:
  - {{ name: b4, address: 203.0.113.11, port: 80, cloud: c, region: r, jurisdiction: EU }}
  - {{ name: b6, address: \"2001:db8:2::11\", port: 80, cloud: c, region: r, jurisdiction: EU }}
"
    )
}

fn service_text(vips: &str, backends: &str) -> String {
    format!(
        "  - name: web
{vips}    port: 80
    protocol: tcp
    backends: [{backends}]
    probe: {{ kind: tcp }}
"
    )
}

/// The errors of `text` as `line: field: message`.
fn errors_of(text: &str) -> Vec<String> {
    match checked(text) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .errors()
            .iter()
            .map(|e| format!("{}: {}: {}", e.line, e.field, e.message))
            .collect(),
    }
}

#[test]
fn ipv6_vips_backends_and_snat_addresses_are_read_in_canonical_form() {
    let text = v6_text(
        "[198.51.100.1, \"2001:DB8:100:0:0::1\"]",
        &service_text(
            "    vip: 192.0.2.10\n    vip6: \"2001:0db8::0010\"\n",
            "b4, b6",
        ),
    );
    let config = checked(&text).unwrap().config;
    assert_eq!(config.node.snat4(), Some(Ipv4Addr::new(198, 51, 100, 1)));
    assert_eq!(config.node.snat6().unwrap().to_string(), "2001:db8:100::1");
    let web = &config.services[0];
    let vips: Vec<String> = web.vips().map(|v| v.to_string()).collect();
    assert_eq!(vips, ["192.0.2.10", "2001:db8::10"]);
    assert_eq!(config.backends[1].address.to_string(), "2001:db8:2::11");
    // An IPv6-only service: `vip` itself is IPv6.
    let text = v6_text(
        "\"2001:db8:100::1\"",
        &service_text("    vip: \"2001:db8::10\"\n", "b6"),
    );
    assert!(checked(&text).is_ok(), "{:?}", errors_of(&text));
    // The shorthand `snat_address` still reads, as a list of one, and
    // writes back as `snat_addresses`.
    let config = minimal();
    assert_eq!(config.node.snat_addresses.len(), 1);
    let yaml = serde_norway::to_string(&config).unwrap();
    assert!(yaml.contains("snat_addresses:"), "{yaml}");
    assert_eq!(parse(&yaml, "again").unwrap(), config);
}

#[test]
fn a_vip_and_its_backends_share_a_family() {
    // An IPv6 backend behind an IPv4-only service: named by its place in
    // the pool.
    let text = v6_text(
        "[198.51.100.1, \"2001:db8:100::1\"]",
        &service_text("    vip: 192.0.2.10\n", "b4, b6"),
    );
    assert_eq!(
        errors_of(&text),
        [
            "10: services[0].backends[1]: backend \"b6\" has an IPv6 address (2001:db8:2::11) \
          but the service has no IPv6 VIP (vip 192.0.2.10): a VIP's traffic goes to backends \
          of its own family; give the service an IPv6 `vip6` to make it dual-stack"
        ]
    );
    // An IPv4 backend behind an IPv6 VIP.
    let text = v6_text(
        "[198.51.100.1, \"2001:db8:100::1\"]",
        &service_text("    vip: \"2001:db8::10\"\n", "b6, b4"),
    );
    assert_eq!(
        errors_of(&text),
        [
            "10: services[0].backends[1]: backend \"b4\" has an IPv4 address (203.0.113.11) \
          but the service has no IPv4 VIP (vip 2001:db8::10): a VIP's traffic goes to \
          backends of its own family"
        ]
    );
    // A dual-stack VIP with no backend of its family.
    let text = v6_text(
        "[198.51.100.1, \"2001:db8:100::1\"]",
        &service_text("    vip: 192.0.2.10\n    vip6: \"2001:db8::10\"\n", "b4"),
    );
    assert_eq!(
        errors_of(&text),
        [
            "8: services[0].vip6: no backend of the pool has an IPv6 address: this VIP would \
          send nothing anywhere"
        ]
    );
}

#[test]
fn each_vip_family_needs_a_snat_address_of_its_own() {
    let text = v6_text(
        "198.51.100.1",
        &service_text("    vip: \"2001:db8::10\"\n", "b6"),
    );
    assert_eq!(
        errors_of(&text),
        [
            "7: services[0].vip: 2001:db8::10 is an IPv6 VIP but node.snat_addresses has no \
          IPv6 address: the node needs one to reach IPv6 backends"
        ]
    );
    // Two of one family.
    let text = v6_text(
        "[\"2001:db8:100::1\", \"2001:db8:100::2\"]",
        &service_text("    vip: \"2001:db8::10\"\n", "b6"),
    );
    assert_eq!(
        errors_of(&text),
        [
            "3: node.snat_addresses[1]: a second IPv6 SNAT address (the first is \
          node.snat_addresses[0]); the node has one per family"
        ]
    );
    let text = v6_text("[]", &service_text("    vip: 192.0.2.10\n", "b4"));
    assert_eq!(
        errors_of(&text),
        [
            "3: node.snat_addresses: give the node a SNAT address (one per family its VIPs use)",
            "7: services[0].vip: 192.0.2.10 is an IPv4 VIP but node.snat_addresses has no \
             IPv4 address: the node needs one to reach IPv4 backends",
        ]
    );
    // The shorthand is named as written.
    let text = minimal_text().replacen("snat_address: 198.51.100.1", "snat_address: ::1", 1);
    let shown = checked(&text).unwrap_err().to_string();
    assert!(
        shown.starts_with("test.yaml:5: node.snat_address: ::1 is a loopback address"),
        "{shown}"
    );
}

#[test]
fn unusable_ipv6_addresses_name_the_field() {
    let cases = [
        ("fe80::1", "is link-local (fe80::/10)"),
        ("ff02::1", "is a multicast address (ff00::/8)"),
        ("::", "is the unspecified address"),
        (
            "::ffff:192.0.2.1",
            "is an IPv4-mapped address (::ffff:0:0/96): write the IPv4 address 192.0.2.1 instead",
        ),
        ("fec0::1", "is site-local (fec0::/10"),
        ("::192.0.2.1", "is IPv4-compatible (::/96"),
        ("::1", "is a loopback address"),
    ];
    for (address, why) in cases {
        let text = v6_text(
            "[198.51.100.1, \"2001:db8:100::1\"]",
            &service_text(
                &format!("    vip: 192.0.2.10\n    vip6: \"{address}\"\n"),
                "b4, b6",
            ),
        );
        let errors = errors_of(&text);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("8: services[0].vip6: ") && e.contains(why)),
            "{address}: {errors:?}"
        );
        // As a backend's address (loopback there only warns).
        let text = v6_text(
            "[198.51.100.1, \"2001:db8:100::1\"]",
            &service_text("    vip: \"2001:db8::10\"\n", "b6"),
        )
        .replacen("2001:db8:2::11", address, 1);
        let errors = errors_of(&text);
        if address == "::1" {
            assert!(errors.is_empty(), "{errors:?}");
        } else {
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with("14: backends[1].address: ") && e.contains(why)),
                "{address}: {errors:?}"
            );
        }
    }
    // An IPv4 address in `vip6`: refused where it is read.
    let text = v6_text(
        "[198.51.100.1, \"2001:db8:100::1\"]",
        &service_text("    vip: 192.0.2.10\n    vip6: 192.0.2.11\n", "b4, b6"),
    );
    let errors = errors_of(&text);
    assert!(
        errors[0].starts_with("8: services[0].vip6: 192.0.2.11 is an IPv4 address"),
        "{errors:?}"
    );
    // `vip6` beside an IPv6 `vip`.
    let text = v6_text(
        "[198.51.100.1, \"2001:db8:100::1\"]",
        &service_text(
            "    vip: \"2001:db8::10\"\n    vip6: \"2001:db8::11\"\n",
            "b6",
        ),
    );
    assert_eq!(
        errors_of(&text),
        [
            "8: services[0].vip6: vip 2001:db8::10 is already IPv6: a dual-stack service has an \
          IPv4 `vip` and an IPv6 `vip6`"
        ]
    );
    // An IPv6 backend's path MTU is at least 1280.
    let text = v6_text(
        "\"2001:db8:100::1\"",
        &service_text("    vip: \"2001:db8::10\"\n", "b6"),
    )
    .replacen("port: 80, cloud", "port: 80, path_mtu: 1279, cloud", 2);
    assert_eq!(
        errors_of(&text),
        [
            "14: backends[1].path_mtu: path_mtu 1279 is below IPv6's minimum link MTU 1280 (RFC 8200)"
        ]
    );
}

#[test]
fn a_dual_stack_listener_clash_names_the_vip_field() {
    let two = format!(
        "{}{}",
        service_text(
            "    vip: 192.0.2.10\n    vip6: \"2001:db8::10\"\n",
            "b4, b6"
        ),
        service_text("    vip: \"2001:db8::10\"\n", "b6").replacen("name: web", "name: api", 1)
    );
    let text = v6_text("[198.51.100.1, \"2001:db8:100::1\"]", &two);
    assert_eq!(
        errors_of(&text),
        [
            "14: services[1].vip: [2001:db8::10]:80/tcp is already served by service \"web\" \
          (services[0].vip6)"
        ]
    );
}

#[test]
fn every_vip_counts_against_the_data_planes_services() {
    // 33 dual-stack services: 66 VIPs, over the 64 the data plane holds.
    let services: String = (0..33)
        .map(|i| {
            format!(
                "  - {{ name: s{i}, vip: 192.0.2.{i}, vip6: \"2001:db8::{i:x}\", port: 80, \
                 protocol: tcp, backends: [b4, b6], probe: {{ kind: tcp }} }}\n"
            )
        })
        .collect();
    let text = v6_text("[198.51.100.1, \"2001:db8:100::1\"]", &services);
    assert_eq!(
        errors_of(&text),
        [
            "5: services: 66 VIPs configured (a dual-stack service has two); the data plane \
          holds at most 64"
        ]
    );
}
