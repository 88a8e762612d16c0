use super::*;
use crate::config::{LoadProfile, ProfileNames};

fn names(p: LoadProfile) -> ProfileNames<'static> {
    p.names().expect("built-in profile")
}

fn refusal(text: &str) -> &'static str {
    parse(text.as_bytes(), &names(LoadProfile::Vllm))
        .expect_err("refused")
        .reason()
}

/// What the project's test backend serves at `/metrics` (one model).
const TESTBACKEND: &str = "# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 3\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 4\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n";

/// vLLM 0.10-style, with HELP lines, two engines (data parallel),
/// counters and histograms around the gauges read.
const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.61
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 123456.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 9.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 9.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.5
"#;

const SGLANG: &str = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen"} 31.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen"} 7.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.93
"#;

const TGI: &str = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n\
# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 16\n\
# TYPE tgi_request_count counter\ntgi_request_count 900\n";

const TRITON: &str = r#"# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="resnet",version="1"} 5
nv_inference_pending_request_count{model="bert",version="1"} 2
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="resnet",version="1"} 1000
"#;

#[test]
fn each_profile_reads_its_own_names() {
    let f = parse(TESTBACKEND.as_bytes(), &names(LoadProfile::Vllm)).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 3.0,
            running: Some(4.0),
            kv: Some(0.5)
        }
    );
    // Engines add up; the fullest KV cache counts.
    let f = parse(VLLM.as_bytes(), &names(LoadProfile::Vllm)).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 3.0,
            running: Some(22.0),
            kv: Some(0.61)
        }
    );
    let f = parse(SGLANG.as_bytes(), &names(LoadProfile::Sglang)).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 7.0,
            running: Some(31.0),
            kv: Some(0.93)
        }
    );
    let f = parse(TGI.as_bytes(), &names(LoadProfile::Tgi)).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 4.0,
            running: Some(16.0),
            kv: None
        }
    );
    let f = parse(TRITON.as_bytes(), &names(LoadProfile::Triton)).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 7.0,
            running: None,
            kv: None
        }
    );
    // A custom profile's names, untyped metrics accepted.
    let custom = ProfileNames {
        waiting: "queue_depth",
        running: None,
        kv: Some("cache_fill"),
    };
    let f = parse(b"queue_depth 2\ncache_fill 0.25\n", &custom).unwrap();
    assert_eq!(
        f,
        Figures {
            waiting: 2.0,
            running: None,
            kv: Some(0.25)
        }
    );
    // The test backend's several models repeat the gauges: each block is
    // read.
    let two = format!("{TESTBACKEND}{}", TESTBACKEND.replace("\"m\"", "\"n\""));
    let f = parse(two.as_bytes(), &names(LoadProfile::Vllm)).unwrap();
    assert_eq!(f.waiting, 6.0);
}

#[test]
fn another_servers_metrics_are_missing_ones() {
    assert_eq!(
        parse(SGLANG.as_bytes(), &names(LoadProfile::Vllm)),
        Err(Refusal::Missing("vllm:num_requests_waiting".into()))
    );
    let no_kv = TESTBACKEND.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc");
    assert_eq!(
        parse(no_kv.as_bytes(), &names(LoadProfile::Vllm)),
        Err(Refusal::Missing("vllm:kv_cache_usage_perc".into()))
    );
    assert_eq!(refusal(""), "malformed");
}

#[test]
fn bad_input_is_refused_with_its_reason() {
    for (text, reason) in [
        // Malformed lines: nothing of the scrape is used.
        (
            "vllm:num_requests_waiting{model_name=\"m\" 3\n",
            "malformed",
        ),
        ("vllm:num_requests_waiting three\n", "malformed"),
        ("<html><body>Bad gateway</body></html>\n", "malformed"),
        (&TESTBACKEND.replace(" 0.5\n", " 0.5 0.7 x\n"), "malformed"),
        // Wrong types.
        (
            &TESTBACKEND.replace(
                "TYPE vllm:num_requests_waiting gauge",
                "TYPE vllm:num_requests_waiting counter",
            ),
            "wrong_type",
        ),
        // Values no server reports.
        (&TESTBACKEND.replace("} 3\n", "} NaN\n"), "bad_value"),
        (&TESTBACKEND.replace("} 3\n", "} +Inf\n"), "bad_value"),
        (&TESTBACKEND.replace("} 3\n", "} -1\n"), "bad_value"),
        (&TESTBACKEND.replace("} 3\n", "} 1e12\n"), "bad_value"),
        (&TESTBACKEND.replace("} 4\n", "} -0.5\n"), "bad_value"),
        (&TESTBACKEND.replace("} 0.5\n", "} 1.5\n"), "bad_value"),
        (&TESTBACKEND.replace("} 0.5\n", "} 50\n"), "bad_value"),
    ] {
        assert_eq!(refusal(text), reason, "{text}");
    }
    let mut latin1 = TESTBACKEND.as_bytes().to_vec();
    latin1.push(0xff);
    assert_eq!(
        parse(&latin1, &names(LoadProfile::Vllm))
            .unwrap_err()
            .reason(),
        "malformed"
    );
    // Huge: refused before anything is parsed.
    let huge = "x".repeat(MAX_BODY + 1);
    assert_eq!(refusal(&huge), "too_large");
    let many: String = (0..=MAX_SAMPLES)
        .map(|i| format!("other_metric{{i=\"{i}\"}} 1\n"))
        .collect();
    assert!(many.len() < MAX_BODY);
    assert_eq!(refusal(&format!("{TESTBACKEND}{many}")), "too_many_samples");
    // Series adding up past any real server's.
    let lots: String = (0..3)
        .map(|i| format!("vllm:num_requests_waiting{{engine=\"{i}\"}} 900000\n"))
        .collect();
    let text = TESTBACKEND.replace("vllm:num_requests_waiting{model_name=\"m\"} 3\n", &lots);
    assert_eq!(refusal(&text), "bad_value");
}

#[test]
fn a_refusal_says_what_and_where_in_one_line() {
    let e = parse(
        b"vllm:num_requests_waiting{model_name=\"m\" 3\n",
        &names(LoadProfile::Vllm),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("malformed: "), "{text}");
    assert!(!text.contains('\n'), "{text}");
    assert!(text.len() < 300, "{text}");
    let e = parse(
        TESTBACKEND.replace("} 3\n", "} NaN\n").as_bytes(),
        &names(LoadProfile::Vllm),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "metric vllm:num_requests_waiting has value NaN: not a finite number"
    );
    for r in Refusal::REASONS {
        assert!(r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
}
