//! `mlxd`: command line, configuration overlay, logging, engine start and HTTP serving.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mlxd::catalog::{default_hf_cache, default_ollama_store, Catalog, CatalogEntry, Sources};
use mlxd::config::{parse_kv_memory, Config};
use mlxd::engine::{EngineConfig, EngineHandle};
use mlxd::output::StreamItem;
use mlxd::request::KeepAlive;
use mlxd::request::{GenerationSpec, MaxTokens, Prompt, SamplingParams};
use mlxd::server::auth::AccessOptions;
use mlxd::server::openai::responses::store::{ResponseStore, StoreLimits};
use mlxd::server::registry::{Loader, ModelRegistry, RegistryOptions, Served};
use mlxd::server::{router, AppState, ConnectionTimeouts, ServerOptions};
use mlxd::text::rerank::Reranker;
use mlxd::text::TextCodec;

/// A local LLM server speaking the OpenAI HTTP API.
#[derive(Parser, Debug)]
#[command(name = "mlxd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve models over HTTP (OpenAI-compatible routes under /v1, Ollama's under /api).
    Serve(Box<ServeArgs>),
    /// Generate one completion of PROMPT and stream it to the terminal.
    Run(RunArgs),
    /// Load-test a running server: concurrent streaming clients, TTFT/ITL/throughput table.
    Bench(BenchArgs),
    /// List the models `serve` would offer (with the same flags) and where each comes from.
    List(ListArgs),
}

/// Where `serve` and `list` find models besides `--model`.
#[derive(Args, Debug)]
struct CatalogArgs {
    /// Serve every model folder and .gguf file in this folder too.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// The Ollama store [default: $OLLAMA_MODELS or ~/.ollama/models, when present].
    #[arg(long)]
    ollama_models: Option<PathBuf>,
    /// The Hugging Face hub cache [default: $HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub, when present].
    #[arg(long)]
    hf_cache: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    catalog: CatalogArgs,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Base URL of the server to load.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Comma-separated concurrency levels, run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests each client sends per level.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Generated tokens per request (EOS is ignored).
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Fraction (0-1) of every prompt shared by all requests of a level.
    #[arg(long, default_value_t = 0.0)]
    shared_prefix: f64,
    /// Seed of the synthetic prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// top_p of every request (1: no nucleus).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// A file holding a JSON schema every request's output must follow (measures the cost of
    /// structured output; outputs end when the schema's output is complete).
    #[arg(long)]
    json_schema: Option<PathBuf>,
}

/// Options shared by every command that loads a model.
#[derive(Args, Debug)]
struct ModelArgs {
    /// The model: a Hugging Face folder (config.json, model.safetensors, tokenizer.json, ...),
    /// a .gguf file, a repository in the Hugging Face cache (`org/name`, `org/name@revision`)
    /// or a name in the Ollama store (`qwen2.5:0.5b`). `serve` takes several; the first is
    /// the default model and is loaded at start.
    #[arg(long, short = 'm')]
    model: Vec<String>,
    /// A GGUF model's vision tower, llama.cpp's mmproj file (Gemma 3's): the (first) model
    /// then takes images. Ollama-store models bring theirs.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// TOML configuration file (see config/mlxd.toml); flags override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda, cuda:N or metal [default: auto, the first CUDA GPU when
    /// this binary was built with the `cuda` feature and the machine has one].
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype: auto, f32, f16 or bf16 [default: auto: f32 on CPU, bf16 on GPU].
    #[arg(long)]
    dtype: Option<String>,
    /// KV cache dtype: auto, f32, f16 or bf16 [default: auto: the compute dtype, but f16 on the
    /// CPU when the weights are not f32 (quantized or half)].
    #[arg(long)]
    kv_dtype: Option<String>,
    /// With an automatic KV budget on a GPU: the share of device memory mlxd may use [default: 0.9].
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// KV cache budget: "auto" (20% of available RAM) or a size such as 512MiB or 2GiB.
    #[arg(long)]
    kv_memory: Option<String>,
    /// Most sequences decoded together [default: 64 on CPU, 256 on GPU].
    #[arg(long)]
    max_seqs: Option<usize>,
    /// Most tokens (prompt chunks + decode tokens) per forward pass [default: 512 on CPU, 4096 on GPU].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Cap on prompt + output tokens per request [default: the model's context length].
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Do not reuse the KV of identical prompt prefixes.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Run every step eagerly instead of replaying decode steps from CUDA graphs (vLLM's
    /// --enforce-eager).
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Make every request's tokens and logprobs independent of what else the server runs
    /// (batch size, preemption, prefix-cache hits), at some speed; on the CPU in f32 for now.
    #[arg(long)]
    deterministic: bool,
    /// Write the prefix cache's full KV blocks through to this directory and read them back
    /// after they were evicted from memory or the server restarted (off by default).
    #[arg(long)]
    kv_disk: Option<PathBuf>,
    /// Most bytes --kv-disk may hold, oldest blocks first out [default: 10GiB].
    #[arg(long)]
    kv_disk_size: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, short = 'p')]
    port: Option<u16>,
    /// Name the API reports for the model [default: the model folder's name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds the first Ctrl-C/SIGTERM lets running requests finish; a second exits at once
    /// [default: 30].
    #[arg(long)]
    shutdown_timeout: Option<f64>,
    /// Largest request body, such as 32MiB; larger bodies get HTTP 413 [default: 32MiB].
    #[arg(long)]
    max_body: Option<String>,
    /// Seconds a client may take to send its headers or pause in its body [default: 30].
    #[arg(long)]
    read_timeout: Option<f64>,
    /// Require `Authorization: Bearer KEY` on every route but /health and / (repeatable).
    #[arg(long = "api-key", env = "MLXD_API_KEY", hide_env_values = true)]
    api_keys: Vec<String>,
    /// File with one API key per line.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Serve /metrics without a key even when keys are required.
    #[arg(long)]
    metrics_public: bool,
    /// Browser origin allowed by CORS besides local ones (repeatable; `*` allows all).
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    #[command(flatten)]
    catalog: CatalogArgs,
    /// How long a model stays loaded after a request: 5m, 1h, seconds; negative: for good;
    /// 0: unload when idle (requests may set `keep_alive`) [default: 5m, as Ollama].
    #[arg(long, allow_hyphen_values = true)]
    keep_alive: Option<String>,
    /// Most models loaded at once; the least recently used idle one is unloaded to make room
    /// (0: no limit) [default: 3].
    #[arg(long)]
    max_loaded_models: Option<usize>,
    /// Most requests waiting beyond the running ones; more get HTTP 429 [default: 256].
    #[arg(long)]
    max_queue: Option<usize>,
    /// Seconds a request may wait before being scheduled; 0 = forever [default: 300].
    #[arg(long)]
    queue_timeout: Option<f64>,
    /// Most tokens a reply generates when its request sets no limit, as llama-server's
    /// --n-predict (0: up to the context's end) [default: 0].
    #[arg(long)]
    default_max_tokens: Option<usize>,
    /// Do not serve the chat page: `GET /` answers `Ollama is running` to browsers too.
    #[arg(long)]
    no_ui: bool,
    /// OpenAI's context rules: refuse (400) a `max_tokens` that does not fit after the prompt
    /// (instead of ending that reply at the context's end with finish reason `length`) and a
    /// chat completion whose conversation does not fit (instead of dropping its oldest turns).
    #[arg(long)]
    strict_context: bool,
    /// Fetch `http(s)` image URLs of requests (by default only base64 `data:` URLs are taken):
    /// from any public address, or with hosts given (comma-separated) from those hosts only,
    /// private ones included. Each fetch is limited to 20 MiB and 10 s.
    #[arg(long, value_name = "HOSTS", num_args = 0..=1, default_missing_value = "", value_delimiter = ',')]
    allow_image_urls: Option<Vec<String>>,
    /// What happens to a thinking model's thoughts: separate (`reasoning_content` / Ollama's
    /// `thinking`), inline (left in the content) or drop [default: separate].
    #[arg(long, value_enum)]
    reasoning_format: Option<mlxd::text::ReasoningMode>,
    /// How embeddings pool the hidden states: mean, last (token) or first [default: what the
    /// model declares (sentence-transformers' pooling config, GGUF pooling_type), else mean].
    #[arg(long, value_enum)]
    pooling: Option<mlxd::request::Pooling>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue.
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> Result<()> {
    pin_compute_threads();
    apply_cuda_env();
    let cli = Cli::parse();
    // `mlxd run` writes the generation to stdout; only warnings share the terminal with it.
    let default_filter = match cli.command {
        Command::Run(_) | Command::List(_) => "warn",
        _ => "info,tower_http=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Bench(args) => runtime.block_on(bench(args)),
        Command::List(args) => list(args),
    }
}

/// candle asks for its thread count on every CPU op and, unless `RAYON_NUM_THREADS` is set,
/// answers by parsing /proc/cpuinfo each time: that costs more than the whole decode step of a
/// small model (measured: 2.0 ms → 0.4 ms per token on stories260k). Fix the count once, here,
/// before any thread exists; an explicit user setting wins.
fn pin_compute_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// `MLXD_CUDA_FORCE_DMMV=1`: candle's CUDA quantized matmuls dequantize the weights (exact,
/// slower) instead of quantizing activations to q8_1 (llama.cpp's fast kernels); an escape
/// hatch and a way to tell a kernel's rounding from a bug.
#[cfg(feature = "cuda")]
fn apply_cuda_env() {
    if std::env::var_os("MLXD_CUDA_FORCE_DMMV").is_some_and(|v| v != "0") {
        candle_core::quantized::cuda::set_force_dmmv(true);
    }
}

#[cfg(not(feature = "cuda"))]
fn apply_cuda_env() {}

/// Config file (if any) overlaid with the flags, validated.
fn load_config(args: &ModelArgs) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let e = &mut cfg.engine;
    if let Some(m) = args.model.first() {
        e.model = Some(PathBuf::from(m));
    }
    if let Some(m) = &args.mmproj {
        e.mmproj = Some(m.clone());
    }
    if let Some(d) = &args.device {
        e.device = d.clone();
    }
    if let Some(d) = &args.dtype {
        e.dtype = d.clone();
    }
    if let Some(d) = &args.kv_dtype {
        e.kv_dtype = d.clone();
    }
    if let Some(u) = args.gpu_memory_utilization {
        e.gpu_memory_utilization = u;
    }
    if let Some(k) = &args.kv_memory {
        e.kv_memory = k.clone();
    }
    if let Some(n) = args.max_model_len {
        e.max_model_len = n;
    }
    if args.no_prefix_cache {
        e.prefix_cache = false;
    }
    if args.no_cuda_graphs {
        e.cuda_graphs = false;
    }
    if args.deterministic {
        e.deterministic = true;
    }
    if let Some(dir) = &args.kv_disk {
        e.kv_disk = Some(dir.clone());
    }
    if let Some(size) = &args.kv_disk_size {
        e.kv_disk_size = size.clone();
    }
    let s = &mut cfg.scheduler;
    if let Some(n) = args.max_seqs {
        s.max_seqs = n;
    }
    if let Some(n) = args.max_batch_tokens {
        s.max_batch_tokens = n;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Starts the engine thread (loading the model at `model_path`, with its vision tower in
/// `mmproj` if given) and loads the tokenizer side.
fn start_engine(
    cfg: &Config,
    model_path: &Path,
    mmproj: Option<&Path>,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>, Arc<TextCodec>)> {
    if !model_path.is_dir() && !mlxd::formats::is_gguf(model_path) {
        bail!(
            "{}: not a model (expected a Hugging Face folder with config.json, or a .gguf file)",
            model_path.display()
        );
    }
    let engine_cfg = EngineConfig {
        model_path: model_path.to_path_buf(),
        mmproj: mmproj.map(Path::to_path_buf),
        device: cfg.engine.device.parse()?,
        dtype: mlxd::device::parse_dtype(&cfg.engine.dtype),
        kv_dtype: mlxd::device::parse_dtype(&cfg.engine.kv_dtype),
        kv_memory_bytes: parse_kv_memory(&cfg.engine.kv_memory)?,
        gpu_memory_utilization: cfg.engine.gpu_memory_utilization,
        block_size: cfg.scheduler.block_size,
        max_num_seqs: (cfg.scheduler.max_seqs > 0).then_some(cfg.scheduler.max_seqs),
        max_num_batched_tokens: (cfg.scheduler.max_batch_tokens > 0).then_some(cfg.scheduler.max_batch_tokens),
        max_model_len: (cfg.engine.max_model_len > 0).then_some(cfg.engine.max_model_len),
        default_max_tokens: (cfg.engine.default_max_tokens > 0).then_some(cfg.engine.default_max_tokens),
        enable_prefix_cache: cfg.engine.prefix_cache,
        cuda_graphs: cfg.engine.cuda_graphs,
        deterministic: cfg.engine.deterministic,
        kv_disk: cfg.kv_disk()?,
        show_progress: true,
        queue_timeout: (cfg.scheduler.queue_timeout > 0.0)
            .then(|| std::time::Duration::from_secs_f64(cfg.scheduler.queue_timeout)),
    };
    let (engine, join) = EngineHandle::spawn(engine_cfg)?;
    let codec = TextCodec::open(model_path, &engine.info().model.eos_token_ids)?;
    Ok((engine, join, Arc::new(codec)))
}

/// Where the catalog looks: `--model` values (else the config's model), `--models-dir`, the
/// Ollama store and the Hugging Face cache (their defaults when not given).
fn catalog_sources(cfg: &Config, models: &[String], args: &CatalogArgs) -> Sources {
    let models = match models {
        [] => cfg.engine.model.iter().map(|p| p.display().to_string()).collect(),
        given => given.to_vec(),
    };
    Sources {
        models,
        mmproj: cfg.engine.mmproj.clone(),
        served_name: cfg.server.served_model_name.clone(),
        models_dir: args.models_dir.clone().or_else(|| cfg.server.models_dir.clone()),
        ollama_store: args
            .ollama_models
            .clone()
            .or_else(|| cfg.server.ollama_models.clone())
            .or_else(default_ollama_store),
        hf_cache: args
            .hf_cache
            .clone()
            .or_else(|| cfg.server.hf_cache.clone())
            .or_else(default_hf_cache),
    }
}

/// Loads catalog entries for the registry: checks an Ollama blob's digest (once per process),
/// starts its engine, picks its embedding pooling.
fn model_loader(cfg: Config) -> Loader {
    let verified = Arc::new(std::sync::Mutex::new(std::collections::HashSet::<String>::new()));
    Arc::new(move |entry: &CatalogEntry| {
        if let Some(ollama) = &entry.ollama {
            let done = verified.lock().map(|v| v.contains(&ollama.digest)).unwrap_or(false);
            if !done {
                mlxd::catalog::verify_digest(&entry.path, &ollama.digest)?;
                if let Ok(mut v) = verified.lock() {
                    v.insert(ollama.digest.clone());
                }
            }
        }
        let (engine, join, codec) =
            start_engine(&cfg, &entry.path, entry.mmproj.as_deref()).map_err(|e| format!("{e:#}"))?;
        let mut served = Served::new(entry.clone(), engine, codec, Some(join));
        served.pooling = cfg
            .server
            .pooling
            .or_else(|| mlxd::catalog::pooling::declared_pooling(&entry.path))
            .unwrap_or_default();
        let info = served.engine.info();
        let cpu_kernel = (info.device == "cpu").then(|| mlxd::compute::cpu::kernels::Kernel::detect().name());
        tracing::info!(
            model = %entry.name,
            architecture = %info.model.architecture,
            device = %info.device,
            cpu_kernel = cpu_kernel.unwrap_or("-"),
            dtype = ?info.model.dtype,
            kv_dtype = ?info.kv_dtype,
            params = %mlxd::models::parameter_size(info.model.num_params),
            kv_blocks = info.num_kv_blocks,
            kv_memory_mib = info.kv_memory_bytes / (1 << 20),
            max_model_len = info.max_model_len,
            "loaded"
        );
        Ok(served)
    })
}

fn list(args: ListArgs) -> Result<()> {
    let cfg = load_config(&args.model)?;
    let sources = catalog_sources(&cfg, &args.model.model, &args.catalog);
    let catalog = Catalog::discover(&sources).map_err(anyhow::Error::msg)?;
    if catalog.entries().is_empty() {
        let place = |p: &Option<PathBuf>| p.as_ref().map_or("none".to_string(), |p| p.display().to_string());
        println!(
            "No models found. Looked in: --models-dir ({}), the Ollama store ({}), the Hugging Face cache ({}); \
             no --model given. Serve one with `mlxd serve --model PATH` (a model folder or a .gguf file).",
            place(&sources.models_dir),
            place(&sources.ollama_store),
            place(&sources.hf_cache),
        );
        return Ok(());
    }
    let width = catalog.entries().iter().map(|e| e.name.len()).max().unwrap_or(4).max(4);
    println!("{:width$}  {:12}  {:8}  PATH", "NAME", "FROM", "USE");
    for e in catalog.entries() {
        let reranks = Reranker::named(&e.name) || Reranker::named(&e.path.to_string_lossy());
        let usage = if reranks { "rerank" } else { "generate" };
        println!(
            "{:width$}  {:12}  {:8}  {}",
            e.name,
            e.origin.as_str(),
            usage,
            e.path.display()
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut cfg = load_config(&args.model)?;
    if let Some(h) = args.host {
        cfg.server.host = h;
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    if let Some(n) = args.served_model_name {
        cfg.server.served_model_name = Some(n);
    }
    if let Some(t) = args.shutdown_timeout {
        cfg.server.shutdown_timeout = t;
    }
    if let Some(b) = args.max_body {
        cfg.server.max_body = b;
    }
    if let Some(t) = args.read_timeout {
        cfg.server.read_timeout = t;
    }
    cfg.server.api_keys.extend(args.api_keys);
    if args.api_key_file.is_some() {
        cfg.server.api_key_file = args.api_key_file;
    }
    cfg.server.metrics_public |= args.metrics_public;
    cfg.server.cors_origins.extend(args.cors_origins);
    if let Some(n) = args.max_queue {
        cfg.scheduler.max_queue = n;
    }
    if let Some(t) = args.queue_timeout {
        cfg.scheduler.queue_timeout = t;
    }
    if let Some(n) = args.default_max_tokens {
        cfg.engine.default_max_tokens = n;
    }
    if args.no_ui {
        cfg.server.ui = false;
    }
    if args.strict_context {
        cfg.server.strict_context = true;
    }
    if let Some(hosts) = args.allow_image_urls {
        cfg.server.allow_image_urls = Some(hosts.into_iter().filter(|h| !h.is_empty()).collect());
    }
    if let Some(mode) = args.reasoning_format {
        cfg.server.reasoning_format = mode;
    }
    if let Some(k) = args.keep_alive {
        cfg.server.keep_alive = k;
    }
    if let Some(n) = args.max_loaded_models {
        cfg.server.max_loaded_models = n;
    }
    if args.pooling.is_some() {
        cfg.server.pooling = args.pooling;
    }
    cfg.validate()?;
    // Bind before loading: an address in use fails at once, not after a long load.
    let addr: SocketAddr = format!("{}:{}", cfg.server.host, cfg.server.port)
        .parse()
        .with_context(|| format!("invalid listen address {}:{}", cfg.server.host, cfg.server.port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let catalog =
        Catalog::discover(&catalog_sources(&cfg, &args.model.model, &args.catalog)).map_err(anyhow::Error::msg)?;
    if catalog.entries().is_empty() {
        bail!("no model to serve: give --model PATH (or a Hugging Face / Ollama name), or --models-dir DIR");
    }
    let keep_alive = KeepAlive::parse(&serde_json::Value::String(cfg.server.keep_alive.clone()))
        .map_err(|e| anyhow::anyhow!("--keep-alive {e}"))?;
    let options = RegistryOptions {
        max_loaded: cfg.server.max_loaded_models,
        keep_alive,
        wait_for_room: Duration::from_secs_f64(cfg.scheduler.queue_timeout.max(1.0)),
    };
    tracing::info!(models = catalog.entries().len(), "models that can be served");
    let models = Arc::new(ModelRegistry::new(catalog, model_loader(cfg.clone()), options));
    // The default model is loaded now: a model that cannot load fails the start, not a request.
    let first = models.get(None).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = first.engine.info().clone();
    tracing::info!(model = %first.name(), "ready: listening on http://{local}");
    drop(first);
    let admission_limit = info.max_num_seqs + cfg.scheduler.max_queue;
    let mut state = AppState::with_models(models.clone(), admission_limit);
    state.reasoning = cfg.server.reasoning_format;
    state.strict_context = cfg.server.strict_context;
    if let Some(hosts) = &cfg.server.allow_image_urls {
        let policy = mlxd::server::image_urls::ImageUrlPolicy::from_hosts(hosts);
        state.image_urls = mlxd::server::image_urls::ImageFetcher::new(policy, Default::default())?;
    }
    state.ui = cfg.server.ui;
    state.responses = Arc::new(ResponseStore::new(StoreLimits {
        max_count: cfg.server.responses_max_count,
        max_bytes: cfg.responses_max_bytes()?,
        ttl: std::time::Duration::from_secs_f64(cfg.server.responses_ttl),
    }));
    let reaper = models.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            reaper.reap();
        }
    });
    let read_timeout = Duration::from_secs_f64(cfg.server.read_timeout);
    let options = ServerOptions {
        max_body_bytes: cfg.max_body_bytes()?,
        body_read_timeout: read_timeout,
        access: AccessOptions {
            api_keys: cfg.api_keys()?,
            metrics_public: cfg.server.metrics_public,
            cors_origins: cfg.server.cors_origins.clone(),
        },
    };
    if !options.access.api_keys.is_empty() {
        tracing::info!(keys = options.access.api_keys.len(), "API keys required");
    }
    let app = router(state.clone(), &options);
    let drain = Duration::from_secs_f64(cfg.server.shutdown_timeout);
    let timeouts = ConnectionTimeouts {
        header_read: read_timeout,
    };
    mlxd::server::serve(listener, app, shutdown_signal(state, drain), timeouts)
        .await
        .context("server error")?;
    tokio::task::spawn_blocking(move || models.unload_all()).await?;
    Ok(())
}

/// Resolves at the first SIGINT/SIGTERM: the server stops admitting and drains what runs. A
/// second signal, or `drain` elapsing, ends the process at once.
async fn shutdown_signal(state: AppState, drain: Duration) {
    wait_for_signal().await;
    state.stop_admitting();
    tracing::info!(
        "shutting down: finishing running requests for at most {:.0} s (signal again to exit now)",
        drain.as_secs_f64()
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
            _ = tokio::time::sleep(drain) => tracing::warn!("shutdown timeout: exiting with requests still running"),
        }
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn bench(args: BenchArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.shared_prefix) {
        bail!("--shared-prefix must be between 0 and 1");
    }
    let cfg = mlxd::bench::BenchConfig {
        url: args.url,
        concurrency: args.concurrency,
        requests_per_client: args.requests_per_client,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        shared_prefix: args.shared_prefix,
        seed: args.seed,
        temperature: args.temperature,
        top_p: args.top_p,
        json_schema: args
            .json_schema
            .map(|path| -> Result<serde_json::Value> {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
            })
            .transpose()?,
    };
    let reports = mlxd::bench::run(&cfg).await?;
    print!("{}", mlxd::bench::format_table(&cfg, &reports));
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let cfg = load_config(&args.model)?;
    let path = cfg.engine.model.clone().context("no model given (--model PATH)")?;
    let (engine, join, codec) = start_engine(&cfg, &path, cfg.engine.mmproj.as_deref())?;
    let mut spec = GenerationSpec::new(Prompt::Text {
        text: args.prompt.clone(),
        add_special_tokens: true,
    });
    spec.sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    spec.max_tokens = MaxTokens::AtMost(args.max_tokens);
    let limits = engine.info().request_limits(&path.display().to_string(), &codec);
    let request = mlxd::request::validate(spec, &codec, &limits)
        .map_err(|e| anyhow::anyhow!(mlxd::server::error::describe(&e, |f| f.openai_name())))?;
    let mut stream = mlxd::output::generate(&engine, codec, request)?;
    let mut out = std::io::stdout().lock();
    while let Some(item) = stream.next().await {
        match item {
            StreamItem::Delta { text, .. } => {
                write!(out, "{text}")?;
                out.flush()?;
            }
            StreamItem::Done { .. } => writeln!(out)?,
            StreamItem::Error(e) => bail!(e),
        }
    }
    engine.shutdown();
    let _ = join.join();
    Ok(())
}
