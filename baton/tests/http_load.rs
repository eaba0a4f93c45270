//! `baton serve` over real HTTP under load and at its end: many concurrent streams, aborted
//! streams giving their KV blocks back, and SIGTERM draining an in-flight stream.
//!
//! The servers are real child processes (see `common`): (A) the shared main server, (D) the
//! quiet one, for the KV accounting test that needs the engine to itself (it holds `QUIET`),
//! and one of its own for the SIGTERM test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Many concurrent streams

#[tokio::test]
async fn sixty_four_concurrent_streams() {
    let Api {
        client, chat: url, ..
    } = api(main_server());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let body = streamed_with_usage(chat_body(
                    &format!("Write a sentence about the number {i}."),
                    16,
                ));
                let s = stream(&client, &url, &body).await;
                let (choices, usage) = assemble(&s, true, true);
                let usage = usage.unwrap();
                check_usage(&usage);
                assert!(usage["completion_tokens"].as_u64().unwrap() <= 16);
                choices[0].finish_reason.clone().unwrap()
            })
        })
        .collect();
    for t in tasks {
        let fr = t.await.expect("a stream failed");
        assert!(fr == "stop" || fr == "length", "{fr}");
    }
}

// ---------------------------------------------------------------------------------------------
// Aborted streams give their KV blocks back

#[tokio::test]
async fn aborted_streams_free_their_kv_blocks() {
    let _quiet = QUIET.lock().await;
    let Api {
        server: d,
        client,
        chat: url,
        ..
    } = api(quiet_server());

    for wave in 0..4 {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let client = client.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    // Long enough that, were they not cancelled, they would run for minutes.
                    let body = with(
                        chat_body(&format!("Tell a long story about ship {wave}-{i}."), 1000),
                        json!({"ignore_eos": true, "stream": true}),
                    );
                    let resp = send_json(&client, &url, None, &body).await;
                    assert_eq!(resp.status().as_u16(), 200);
                    let mut sse = Sse::new(resp);
                    read_until_content(&mut sse).await;
                    drop(sse); // the client goes away mid-stream
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("an aborted stream failed");
        }
    }

    let metrics_url = d.url("/metrics");
    let (ok, last) = wait_for(Duration::from_secs(60), || async {
        let (_, m) = get_text(&client, &metrics_url).await;
        let zero = |name| metric(&m, name) == Some(0.0);
        (
            zero("baton_kv_blocks_used")
                && zero("baton_running_sequences")
                && zero("baton_waiting_sequences")
                && zero("baton_inflight_requests"),
            m,
        )
    })
    .await;
    assert!(
        ok,
        "60 s after 200 aborted streams, KV blocks or sequences are still held:\n{}",
        last.lines()
            .filter(|l| l.starts_with("baton_") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // And the server still serves.
    check_chat(&ok_json(&client, &url, &chat_body("hi", 4)).await);
}

// ---------------------------------------------------------------------------------------------
// Shutdown

/// SIGTERM lets an in-flight stream finish, then the server exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_0() {
    let (e, exited) = spawn_server("drain", &["--num-kv-blocks", "32", "--drain-timeout", "60"])
        .unwrap_or_else(|err| panic!("server drain failed to start: {err}"));
    let client = client();
    let body = streamed_with_usage(with(
        chat_body("Tell me a story.", 48),
        json!({"ignore_eos": true}),
    ));
    let resp = send_json(&client, &e.url("/v1/chat/completions"), None, &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::new(resp);
    let mut events = read_until_content(&mut sse).await;
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(e.pid as i32, libc::SIGTERM) }, 0);
    while let Some(data) = sse.next().await {
        events.push(data);
    }
    let s = Stream::from_events(&events);
    assert_stream_length(&s, true, 48, "the stream in flight at SIGTERM");
    let status = tokio::task::spawn_blocking(move || exited.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("still running 60 s after SIGTERM\n{}", e.log_tail()));
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        e.log_tail()
    );
}
