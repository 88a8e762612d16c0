use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::*;
use crate::{config::LoadProfile, health::canned};

/// How the test server answers each request.
#[derive(Clone)]
enum Answer {
    /// Status and body, whole.
    Body(u16, Arc<[u8]>),
    /// A head promising a body, then a byte every 50 ms.
    Dribble,
    /// Reads the request, says nothing.
    Silent,
}

async fn server(answer: Answer) -> BackendTarget {
    let srv = canned::serve(move |mut s| {
        let answer = answer.clone();
        async move {
            match answer {
                Answer::Body(status, body) => {
                    let mut whole = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    whole.extend_from_slice(&body);
                    while canned::answer(&mut s, &whole).await {}
                }
                Answer::Dribble => {
                    if !canned::answer(&mut s, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                        .await
                    {
                        return;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if s.write_all(b"#").await.is_err() {
                            return;
                        }
                    }
                }
                Answer::Silent => {
                    if canned::read_request(&mut s).await {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        }
    })
    .await;
    BackendTarget::new("b1", srv.addr)
}

const VLLM: &str = "# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 2\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 6\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.75\n";

fn scraper(t: &BackendTarget) -> Scraper {
    Scraper::new(
        t,
        &LoadScrape::new(LoadProfile::Vllm),
        None,
        Duration::from_millis(300),
    )
    .unwrap()
}

#[tokio::test]
async fn scrapes_figures_on_a_kept_connection() {
    let t = server(Answer::Body(200, VLLM.as_bytes().into())).await;
    let s = scraper(&t);
    for _ in 0..3 {
        assert_eq!(
            s.scrape().await,
            Ok(Figures {
                waiting: 2.0,
                running: Some(6.0),
                kv: Some(0.75)
            })
        );
    }
}

#[tokio::test]
async fn bad_answers_are_refused_with_their_reason() {
    let reason = |answer| async move {
        let t = server(answer).await;
        scraper(&t).scrape().await.unwrap_err().reason()
    };
    assert_eq!(
        reason(Answer::Body(503, b"busy".as_slice().into())).await,
        "status"
    );
    assert_eq!(
        reason(Answer::Body(200, b"<html>oops</html>".as_slice().into())).await,
        "malformed"
    );
    let huge: Arc<[u8]> = vec![b'#'; parse::MAX_BODY + 1].into();
    assert_eq!(reason(Answer::Body(200, huge)).await, "too_large");
    let started = Instant::now();
    assert_eq!(reason(Answer::Dribble).await, "timeout");
    assert_eq!(reason(Answer::Silent).await, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the timeout"
    );
    // Nothing listening.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = BackendTarget::new("b1", gone.local_addr().unwrap());
    drop(gone);
    assert_eq!(
        scraper(&t).scrape().await.unwrap_err().reason(),
        "unreachable"
    );
}

#[tokio::test]
async fn the_task_sends_every_result_and_stops_when_dropped() {
    let t = server(Answer::Body(200, VLLM.as_bytes().into())).await;
    let mut probe = config::Probe::new(ProbeKind::Tcp(config::TcpCheck {}));
    let (tx, mut rx) = mpsc::channel(4);
    assert!(
        spawn_scraper(&t, &probe, &TlsOptions::default(), tx.clone())
            .unwrap()
            .is_none(),
        "no facet, no task"
    );
    let mut facet = LoadScrape::new(LoadProfile::Vllm);
    facet.interval = Duration::from_millis(100);
    probe.load = Some(facet);
    let task = spawn_scraper(&t, &probe, &TlsOptions::default(), tx)
        .unwrap()
        .unwrap();
    for _ in 0..2 {
        let ev = rx.recv().await.unwrap();
        assert_eq!(&*ev.backend, "b1");
        assert_eq!(ev.result.unwrap().waiting, 2.0);
    }
    drop(task);
    // The task's sender goes with it.
    while rx.recv().await.is_some() {}
}
