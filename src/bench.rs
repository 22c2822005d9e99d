//! `mlxd bench`: a load generator against a running server's `/v1/completions` (any
//! OpenAI-compatible server works). N concurrent streaming clients send token-id prompts with
//! a configurable shared-prefix fraction and report throughput, TTFT, inter-token latency and
//! the prefix-cache hit rate per concurrency level.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Server base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Concurrency levels to run, one after the other.
    pub concurrency: Vec<usize>,
    /// Requests each client sends (sequentially) per level.
    pub requests_per_client: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Output length in tokens (EOS ignored, so exactly this many).
    pub output_tokens: usize,
    /// Fraction of each prompt shared by every request of a level (0 = all distinct).
    pub shared_prefix: f64,
    /// Seed of the prompt generator.
    pub seed: u64,
    /// Sampling temperature of every request (0: greedy).
    pub temperature: f32,
    /// Nucleus of every request (1: none).
    pub top_p: f32,
    /// A JSON schema every request's output must follow (structured output), or none.
    pub json_schema: Option<Value>,
}

/// Results of one concurrency level.
#[derive(Clone, Debug)]
pub struct LevelReport {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests completed.
    pub num_requests: usize,
    /// Generated tokens per second of wall time.
    pub output_tokens_per_s: f64,
    /// Time to first token, median and 90th percentile (ms).
    pub ttft_ms: (f64, f64),
    /// Inter-token latency, median and 90th percentile (ms).
    pub itl_ms: (f64, f64),
    /// Cached prompt tokens / prompt tokens.
    pub prefix_hit_rate: f64,
}

struct RequestResult {
    ttft: Duration,
    gaps: Vec<Duration>,
    completion_tokens: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Token ids used for synthetic prompts: ordinary ids present in every supported vocabulary.
const PROMPT_ID_RANGE: std::ops::Range<u32> = 3..259;

/// Runs every level and returns one report per level.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<Vec<LevelReport>> {
    // A fresh connection per request: a server may close an idle keep-alive connection just
    // as a pooled one is reused ("connection closed before message completed", seen with
    // llama-server), failing a measurement; a loopback connect costs far less than a token.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let mut reports = Vec::new();
    for (level, &concurrency) in cfg.concurrency.iter().enumerate() {
        // A fresh seed per level: nothing of an earlier level can be cached.
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ ((level as u64 + 1) << 32));
        let shared_len = (cfg.prompt_tokens as f64 * cfg.shared_prefix).round() as usize;
        let shared: Vec<u32> = (0..shared_len).map(|_| rng.random_range(PROMPT_ID_RANGE)).collect();
        let prompts: Vec<Vec<Vec<u32>>> = (0..concurrency)
            .map(|_| {
                (0..cfg.requests_per_client)
                    .map(|_| {
                        let mut p = shared.clone();
                        p.extend((shared_len..cfg.prompt_tokens).map(|_| rng.random_range(PROMPT_ID_RANGE)));
                        p
                    })
                    .collect()
            })
            .collect();
        let started = Instant::now();
        let clients = prompts.into_iter().map(|list| {
            let client = client.clone();
            async move {
                let mut out = Vec::new();
                for prompt in list {
                    out.push(one_request(&client, cfg, prompt).await?);
                }
                anyhow::Ok(out)
            }
        });
        let results: Vec<RequestResult> = futures::future::try_join_all(clients)
            .await?
            .into_iter()
            .flatten()
            .collect();
        reports.push(summarize(concurrency, &results, started.elapsed()));
    }
    Ok(reports)
}

async fn one_request(client: &reqwest::Client, cfg: &BenchConfig, prompt: Vec<u32>) -> anyhow::Result<RequestResult> {
    let mut body = json!({
        "prompt": prompt, "max_tokens": cfg.output_tokens, "ignore_eos": true,
        "temperature": cfg.temperature, "top_p": cfg.top_p,
        "stream": true, "stream_options": {"include_usage": true}
    });
    if let Some(schema) = &cfg.json_schema {
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
    }
    let sent = Instant::now();
    let resp = client
        .post(format!("{}/v1/completions", cfg.url.trim_end_matches('/')))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        anyhow::bail!(
            "server answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut events = resp.bytes_stream();
    let mut buffer = String::new();
    let (mut first, mut last) = (None, None);
    let mut gaps = Vec::new();
    let mut usage = Value::Null;
    while let Some(chunk) = events.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                match last {
                    None => first = Some(now - sent),
                    Some(prev) => gaps.push(now - prev),
                }
                last = Some(now);
            }
        }
    }
    let count = |k: &str| usage[k].as_u64().unwrap_or(0);
    Ok(RequestResult {
        ttft: first.unwrap_or_default(),
        gaps,
        completion_tokens: count("completion_tokens"),
        prompt_tokens: count("prompt_tokens"),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
    })
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

fn summarize(concurrency: usize, results: &[RequestResult], wall: Duration) -> LevelReport {
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let tokens: u64 = results.iter().map(|r| r.completion_tokens).sum();
    let prompt: u64 = results.iter().map(|r| r.prompt_tokens).sum();
    let cached: u64 = results.iter().map(|r| r.cached_tokens).sum();
    LevelReport {
        concurrency,
        num_requests: results.len(),
        output_tokens_per_s: tokens as f64 / wall.as_secs_f64(),
        ttft_ms: percentiles(results.iter().map(|r| ms(&r.ttft)).collect()),
        itl_ms: percentiles(results.iter().flat_map(|r| r.gaps.iter().map(ms)).collect()),
        prefix_hit_rate: if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        },
    }
}

/// The report as an aligned text table.
pub fn format_table(cfg: &BenchConfig, reports: &[LevelReport]) -> String {
    let mut out = format!(
        "prompt {} tokens ({:.0}% shared), output {} tokens, {} requests per client, temperature {}, top_p {}{}\n",
        cfg.prompt_tokens,
        cfg.shared_prefix * 100.0,
        cfg.output_tokens,
        cfg.requests_per_client,
        cfg.temperature,
        cfg.top_p,
        if cfg.json_schema.is_some() {
            ", output constrained by a JSON schema"
        } else {
            ""
        }
    );
    out.push_str("concurrency  requests  out_tok/s  ttft_p50_ms  ttft_p90_ms  itl_p50_ms  itl_p90_ms  prefix_hit\n");
    for r in reports {
        out.push_str(&format!(
            "{:>11}  {:>8}  {:>9.1}  {:>11.2}  {:>11.2}  {:>10.2}  {:>10.2}  {:>9.1}%\n",
            r.concurrency,
            r.num_requests,
            r.output_tokens_per_s,
            r.ttft_ms.0,
            r.ttft_ms.1,
            r.itl_ms.0,
            r.itl_ms.1,
            r.prefix_hit_rate * 100.0
        ));
    }
    out
}
