//! The prefix cache's second tier: full KV blocks written through to a directory (`--kv-disk`)
//! by a thread of their own, and read back into free blocks when a prompt's prefix is on disk
//! but no longer in memory (evicted, or the server restarted). The engine never waits on the
//! disk: it hands block contents over a channel, and loaded blocks come back to it as an
//! `EngineCommand::BlocksLoaded` while the request waits outside the scheduler.

mod store;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc::{UnboundedSender, WeakUnboundedSender};

pub use store::{DiskStore, OpenReport, PutOutcome, StoreIdentity};

use super::metrics::EngineMetrics;
use super::EngineCommand;
use crate::request::RequestId;
use crate::scheduler::kv::BlockHash;

/// Where and how much.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvDiskConfig {
    /// The directory.
    pub dir: PathBuf,
    /// Most bytes it may hold.
    pub max_bytes: u64,
}

enum Job {
    Write(BlockHash, Vec<u8>),
    Read(RequestId, Vec<BlockHash>),
    Pin(
        Vec<BlockHash>,
        bool,
        tokio::sync::oneshot::Sender<Result<usize, String>>,
    ),
}

/// The engine's side of the disk tier.
pub(crate) struct DiskCache {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Hashes on disk (the writer's index, mirrored for the engine's lookups).
    on_disk: Arc<RwLock<HashSet<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskCache {
    /// Opens `cfg.dir` for blocks of `identity`; loaded blocks are sent to the engine on
    /// `engine`. A directory that cannot be used is a warning (None): the cache stays in memory.
    pub fn start(
        cfg: &KvDiskConfig,
        identity: StoreIdentity,
        engine: UnboundedSender<EngineCommand>,
        metrics: Arc<EngineMetrics>,
    ) -> Option<Self> {
        let (store, report) = match DiskStore::open(&cfg.dir, identity, cfg.max_bytes) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(dir = %cfg.dir.display(), error = %e, "KV disk cache unavailable; the prefix cache stays in memory");
                return None;
            }
        };
        if report.foreign > 0 {
            tracing::info!(dir = %cfg.dir.display(), files = report.foreign, "KV disk cache: ignoring blocks of another model, dtype, layout or version");
        }
        tracing::info!(dir = %cfg.dir.display(), blocks = report.found, bytes = store.total_bytes(), "KV disk cache ready");
        let on_disk = Arc::new(RwLock::new(store.hashes().collect::<HashSet<_>>()));
        let (jobs, rx) = std::sync::mpsc::channel();
        let index = on_disk.clone();
        // Weak: the disk thread must not keep the engine's command channel open.
        let engine = engine.downgrade();
        let thread = std::thread::Builder::new()
            .name("mlxd-kv-disk".into())
            .spawn(move || serve_jobs(store, rx, index, engine, metrics))
            .ok()?;
        Some(Self {
            jobs,
            on_disk,
            thread: Some(thread),
        })
    }

    /// Whether block `hash` is on disk.
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.on_disk.read().map(|s| s.contains(&hash.0)).unwrap_or(false)
    }

    /// Queues a block for writing.
    pub fn write(&self, hash: BlockHash, payload: Vec<u8>) {
        let _ = self.jobs.send(Job::Write(hash, payload));
    }

    /// Pins (or unpins) blocks after every write queued before: the answer is how many of them
    /// are on disk.
    pub fn pin(&self, hashes: Vec<BlockHash>, pin: bool, reply: tokio::sync::oneshot::Sender<Result<usize, String>>) {
        let _ = self.jobs.send(Job::Pin(hashes, pin, reply));
    }

    /// Queues the reading of `hashes` for request `id` (the leading ones that read back come
    /// to the engine as `BlocksLoaded`).
    pub fn read(&self, id: RequestId, hashes: Vec<BlockHash>) {
        let _ = self.jobs.send(Job::Read(id, hashes));
    }
}

impl Drop for DiskCache {
    /// Writes what is pending (a graceful shutdown loses nothing already handed over).
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_jobs(
    mut store: DiskStore,
    jobs: std::sync::mpsc::Receiver<Job>,
    index: Arc<RwLock<HashSet<u64>>>,
    engine: WeakUnboundedSender<EngineCommand>,
    metrics: Arc<EngineMetrics>,
) {
    let mut warned = false;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Write(hash, payload) => match store.put(hash.0, &payload) {
                Ok(out) => {
                    metrics.kv_disk_bytes_written.inc_by(out.written);
                    metrics.kv_disk_evictions.inc_by(out.evicted);
                    if let Ok(mut set) = index.write() {
                        set.insert(hash.0);
                        if out.evicted > 0 {
                            set.retain(|h| store.contains(*h));
                        }
                    }
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "KV disk cache: a block could not be written (disk full or not writable?); the cache keeps working in memory");
                }
                Err(_) => {}
            },
            Job::Pin(hashes, pin, reply) => {
                let hashes: Vec<u64> = hashes.iter().map(|h| h.0).collect();
                let _ = reply.send(store.pin(&hashes, pin).map_err(|e| e.to_string()));
                if let Ok(mut set) = index.write() {
                    set.retain(|h| store.contains(*h));
                }
            }
            Job::Read(id, hashes) => {
                let mut blocks = Vec::new();
                for hash in hashes {
                    match store.get(hash.0) {
                        Some(payload) => {
                            metrics.kv_disk_bytes_read.inc_by(payload.len() as u64);
                            blocks.push((hash, payload));
                        }
                        None => {
                            if let Ok(mut set) = index.write() {
                                set.remove(&hash.0);
                            }
                            break;
                        }
                    }
                }
                if let Some(engine) = engine.upgrade() {
                    let _ = engine.send(EngineCommand::BlocksLoaded { id, blocks });
                }
            }
        }
    }
}
