//! The models this server has loaded, each with its own engine thread and KV pool (the
//! one-owner design holds per model): a request naming a model that is not loaded loads it
//! (the first request waits, the others are served meanwhile); idle models are unloaded when
//! their keep-alive runs out, or least recently used first when a new one needs the room. A
//! model with requests in flight is never unloaded: each request holds a `ModelLease`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::catalog::{Catalog, CatalogEntry, NotFound};
use crate::engine::EngineHandle;
use crate::models::ModelSummary;
use crate::request::{KeepAlive, Pooling, RequestLimits};
use crate::text::TextCodec;

/// A loaded model: its engine, tokenizer side and request limits.
pub struct Served {
    /// The catalog entry it was loaded from (its name is the one clients use).
    pub entry: CatalogEntry,
    /// Its engine.
    pub engine: EngineHandle,
    /// Its tokenizer and chat template.
    pub codec: Arc<TextCodec>,
    /// What its requests are validated against.
    pub limits: Arc<RequestLimits>,
    /// `system_fingerprint` of its responses: the backend and dtype.
    pub fingerprint: String,
    /// How its embeddings are pooled.
    pub pooling: Pooling,
    join: Mutex<Option<std::thread::JoinHandle<()>>>,
    keep: Mutex<Keep>,
}

#[derive(Clone, Copy, Debug)]
struct Keep {
    /// None: never expires.
    expires: Option<Instant>,
    last_used: Instant,
}

impl Served {
    /// A model whose engine runs on `join`'s thread.
    pub fn new(
        entry: CatalogEntry,
        engine: EngineHandle,
        codec: Arc<TextCodec>,
        join: Option<std::thread::JoinHandle<()>>,
    ) -> Self {
        let fingerprint = format!("mlxd-{}-{:?}", env!("CARGO_PKG_VERSION"), engine.info().model.dtype).to_lowercase();
        let limits = Arc::new(engine.info().request_limits(&entry.name, &codec));
        Self {
            entry,
            engine,
            codec,
            limits,
            fingerprint,
            pooling: Pooling::default(),
            join: Mutex::new(join),
            keep: Mutex::new(Keep {
                expires: None,
                last_used: Instant::now(),
            }),
        }
    }

    /// What it is, as listings show it (from the loaded engine; the context it serves).
    pub fn summary(&self) -> ModelSummary {
        let info = self.engine.info();
        let m = &info.model;
        ModelSummary {
            architecture: m.architecture.clone(),
            model_type: m.model_type.clone(),
            num_params: m.num_params,
            max_position_embeddings: info.max_model_len,
            weights: m.weights.clone(),
        }
    }

    /// The name clients use.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// When it will be unloaded if no request comes (None: never).
    pub fn expires_at(&self) -> Option<Instant> {
        self.keep.lock().map(|k| k.expires).unwrap_or(None)
    }

    fn keep_until(&self, keep_alive: KeepAlive) {
        if let Ok(mut k) = self.keep.lock() {
            let now = Instant::now();
            k.expires = keep_alive.deadline(now);
            k.last_used = now;
        }
    }
}

impl Drop for Served {
    /// Stops the engine and waits for its thread: the weights and the KV pool are freed.
    fn drop(&mut self) {
        self.engine.shutdown();
        if let Some(join) = self.join.lock().ok().and_then(|mut j| j.take()) {
            let _ = join.join();
        }
        tracing::info!(model = %self.entry.name, "unloaded");
    }
}

/// A request's hold on a loaded model: while any lease lives the model is not unloaded; the
/// last one to go restarts its keep-alive.
#[derive(Clone)]
pub struct ModelLease {
    served: Arc<Served>,
    keep_alive: KeepAlive,
}

impl ModelLease {
    /// The model.
    pub fn served(&self) -> &Arc<Served> {
        &self.served
    }

    /// The same lease with another keep-alive (the request's `keep_alive`).
    pub fn keeping(mut self, keep_alive: KeepAlive) -> Self {
        self.keep_alive = keep_alive;
        self.served.keep_until(keep_alive);
        self
    }
}

impl std::ops::Deref for ModelLease {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.served
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        self.served.keep_until(self.keep_alive);
    }
}

/// A catalog entry as listings show it.
pub struct Described {
    /// The entry.
    pub entry: CatalogEntry,
    /// What it is.
    pub summary: ModelSummary,
    /// The model, when it is loaded.
    pub served: Option<Arc<Served>>,
}

/// Why a request cannot have its model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No such model (the closest names are attached).
    #[error(transparent)]
    NotFound(#[from] NotFound),
    /// The model could not be loaded.
    #[error("model '{name}' could not be loaded: {reason}")]
    Load {
        /// The model.
        name: String,
        /// Why.
        reason: String,
    },
    /// Every loaded model stayed busy and the limit leaves no room for another.
    #[error("model '{0}' cannot be loaded now: every loaded model is busy and --max-loaded-models is reached")]
    NoRoom(String),
}

/// Loads a catalog entry (blocking: reads weights, starts the engine thread).
pub type Loader = Arc<dyn Fn(&CatalogEntry) -> Result<Served, String> + Send + Sync>;

type Slot = Arc<OnceCell<Result<Arc<Served>, String>>>;

/// The catalog and the models loaded from it.
pub struct ModelRegistry {
    catalog: Catalog,
    loader: Option<Loader>,
    slots: Mutex<HashMap<String, Slot>>,
    max_loaded: usize,
    keep_alive: KeepAlive,
    wait_for_room: Duration,
}

/// How the registry loads and keeps models.
#[derive(Clone, Copy, Debug)]
pub struct RegistryOptions {
    /// Most models loaded at once (0: no limit).
    pub max_loaded: usize,
    /// The keep-alive of requests that do not set one.
    pub keep_alive: KeepAlive,
    /// How long a request waits for a busy model to go idle when it needs its room.
    pub wait_for_room: Duration,
}

impl ModelRegistry {
    /// A registry over `catalog` that loads with `loader`.
    pub fn new(catalog: Catalog, loader: Loader, options: RegistryOptions) -> Self {
        Self {
            catalog,
            loader: Some(loader),
            slots: Mutex::new(HashMap::new()),
            max_loaded: options.max_loaded,
            keep_alive: options.keep_alive,
            wait_for_room: options.wait_for_room,
        }
    }

    /// A registry of one model, already loaded, that never unloads (tests, embedders).
    pub fn pinned(served: Served) -> Self {
        let name = served.entry.name.clone();
        let catalog = Catalog::of(vec![served.entry.clone()]);
        let slot: Slot = Arc::new(OnceCell::new_with(Some(Ok(Arc::new(served)))));
        Self {
            catalog,
            loader: None,
            slots: Mutex::new(HashMap::from([(name, slot)])),
            max_loaded: 0,
            keep_alive: KeepAlive::Forever,
            wait_for_room: Duration::ZERO,
        }
    }

    /// Every model that can be served.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The models loaded now.
    pub fn loaded(&self) -> Vec<Arc<Served>> {
        let slots = self
            .slots
            .lock()
            .map(|s| s.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        slots
            .iter()
            .filter_map(|slot| slot.get().and_then(|r| r.as_ref().ok()).cloned())
            .collect()
    }

    /// Every catalog entry with what it is: from its engine when loaded, else from its files
    /// headers (blocking I/O). An entry that cannot be described is left out, with a warning.
    pub fn describe_all(&self) -> Vec<Described> {
        let loaded = self.loaded();
        self.catalog
            .entries()
            .iter()
            .filter_map(|entry| {
                let served = loaded.iter().find(|s| s.entry.name == entry.name).cloned();
                let summary = match &served {
                    Some(s) => s.summary(),
                    None => match crate::models::describe(&entry.path) {
                        Ok(summary) => summary,
                        Err(e) => {
                            tracing::warn!(model = %entry.name, error = %e, "cannot describe; not listed");
                            return None;
                        }
                    },
                };
                Some(Described {
                    entry: entry.clone(),
                    summary,
                    served,
                })
            })
            .collect()
    }

    /// The model `name` means (None or empty: the first of the catalog), loaded if it is not,
    /// leased with the server's default keep-alive.
    pub async fn get(&self, name: Option<&str>) -> Result<ModelLease, ModelError> {
        let entry = match name.filter(|n| !n.is_empty()) {
            Some(name) => self.catalog.resolve(name)?.clone(),
            None => self.catalog.entries().first().cloned().ok_or_else(|| NotFound {
                name: String::new(),
                close: Vec::new(),
                known: Vec::new(),
            })?,
        };
        let deadline = Instant::now() + self.wait_for_room;
        let slot = loop {
            match self.slot_for(&entry) {
                Some(slot) => break slot,
                None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                None => return Err(ModelError::NoRoom(entry.name.clone())),
            }
        };
        let result = slot
            .get_or_init(|| async {
                let loader = self.loader.clone().ok_or("this server cannot load models")?;
                let e = entry.clone();
                tracing::info!(model = %e.name, path = %e.path.display(), "loading");
                match tokio::task::spawn_blocking(move || loader(&e)).await {
                    Ok(r) => r.map(Arc::new),
                    Err(e) => Err(format!("the loader crashed: {e}")),
                }
            })
            .await;
        match result {
            Ok(served) => Ok(ModelLease {
                served: served.clone(),
                keep_alive: self.keep_alive,
            }
            .keeping(self.keep_alive)),
            Err(reason) => {
                self.forget_failed(&entry.name, &slot);
                Err(ModelError::Load {
                    name: entry.name.clone(),
                    reason: reason.clone(),
                })
            }
        }
    }

    /// The slot of `entry` (a new one when there is room, unloading the least recently used
    /// idle model if need be); None while every loaded model is busy and there is no room.
    fn slot_for(&self, entry: &CatalogEntry) -> Option<Slot> {
        let mut slots = self.slots.lock().ok()?;
        if let Some(slot) = slots.get(&entry.name) {
            return Some(slot.clone());
        }
        while self.max_loaded > 0 && slots.len() >= self.max_loaded {
            let victim = slots
                .iter()
                .filter_map(|(name, slot)| Some((name.clone(), idle(slot)?)))
                .min_by_key(|(_, last_used)| *last_used)?
                .0;
            unload(slots.remove(&victim));
        }
        let slot: Slot = Arc::new(OnceCell::new());
        slots.insert(entry.name.clone(), slot.clone());
        Some(slot)
    }

    fn forget_failed(&self, name: &str, slot: &Slot) {
        if let Ok(mut slots) = self.slots.lock() {
            if slots.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                slots.remove(name);
            }
        }
    }

    /// Unloads `name` now if it is loaded and idle; a busy model is unloaded as soon as its
    /// requests end (Ollama's `keep_alive: 0`).
    pub fn unload_when_idle(&self, name: &str) {
        let Ok(mut slots) = self.slots.lock() else { return };
        let Some(slot) = slots.get(name) else { return };
        if idle(slot).is_some() {
            unload(slots.remove(name));
        } else if let Some(Ok(served)) = slot.get() {
            served.keep_until(KeepAlive::For(Duration::ZERO));
        }
    }

    /// Unloads every model (shutdown, after the requests drained), waiting for the engines.
    pub fn unload_all(&self) {
        let slots: Vec<Slot> = match self.slots.lock() {
            Ok(mut slots) => slots.drain().map(|(_, slot)| slot).collect(),
            Err(_) => return,
        };
        drop(slots);
    }

    /// Unloads every idle model whose keep-alive ran out (called periodically).
    pub fn reap(&self) {
        let Ok(mut slots) = self.slots.lock() else { return };
        let now = Instant::now();
        let expired: Vec<String> = slots
            .iter()
            .filter(|(_, slot)| idle(slot).is_some())
            .filter(|(_, slot)| {
                slot.get()
                    .and_then(|r| r.as_ref().ok())
                    .and_then(|s| s.expires_at())
                    .is_some_and(|t| t <= now)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            unload(slots.remove(&name));
        }
    }
}

/// When an idle loaded model was last used; None when it is loading, failed, or has requests
/// in flight (someone besides its slot holds it).
fn idle(slot: &Slot) -> Option<Instant> {
    let served = slot.get()?.as_ref().ok()?;
    (Arc::strong_count(served) == 1).then(|| served.keep.lock().map(|k| k.last_used).ok())?
}

/// Drops a removed slot off the async threads (stopping an engine joins its thread), then
/// returns the freed memory to the system.
fn unload(slot: Option<Slot>) {
    let Some(slot) = slot else { return };
    let release = move || {
        drop(slot);
        crate::device::release_freed_memory();
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(release);
        }
        Err(_) => release(),
    }
}
