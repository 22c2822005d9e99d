//! KV blocks on disk, one file per block under its chained hash: a header (magic, format
//! version, the cache's identity salt, the hash, the payload's length and xxh3 checksum) then
//! the block's bytes. Written to a temporary name and renamed (atomic: concurrent servers on
//! one directory never see half a file); the directory is kept under a byte budget, oldest
//! first out. A file that is foreign (another model, dtype, layout or format), truncated or
//! corrupt is never served: it is a miss.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MLXDKV\0\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 48;
/// The file listing pinned block hashes (hex, one a line).
const PINS_FILE: &str = "pins";

/// What makes blocks interchangeable: the same weights computed in the same dtype with the
/// same block layout (folded into one salt), and the block's size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreIdentity {
    /// Hash of the model's weights digest, KV dtype and block layout.
    pub salt: u64,
    /// Bytes of one block's payload.
    pub block_bytes: usize,
}

/// What opening a directory found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Blocks of this identity, indexed.
    pub found: usize,
    /// Files of another model, version or layout, ignored.
    pub foreign: usize,
}

/// The result of storing one block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// Bytes written (0 when it was there already).
    pub written: u64,
    /// Files removed to stay under the budget.
    pub evicted: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    bytes: u64,
    age: u64,
}

/// The blocks of one identity in a directory.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    identity: StoreIdentity,
    max_bytes: u64,
    index: HashMap<u64, Entry>,
    /// age → hash, oldest first.
    by_age: BTreeMap<u64, u64>,
    total: u64,
    next_age: u64,
    /// Blocks kept whatever the budget until unpinned (saved in `pins` beside them).
    pinned: std::collections::HashSet<u64>,
}

impl DiskStore {
    /// Opens (creating) `dir` and indexes the blocks of `identity` found there.
    pub fn open(dir: &Path, identity: StoreIdentity, max_bytes: u64) -> std::io::Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            identity,
            max_bytes,
            index: HashMap::new(),
            by_age: BTreeMap::new(),
            total: 0,
            next_age: 0,
            pinned: std::fs::read_to_string(dir.join(PINS_FILE))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
                .collect(),
        };
        let mut report = OpenReport::default();
        let mut files: Vec<(std::time::SystemTime, u64, u64)> = Vec::new();
        for sub in std::fs::read_dir(dir)?.flatten().filter(|e| e.path().is_dir()) {
            for file in std::fs::read_dir(sub.path())?.flatten() {
                let path = file.path();
                if path.extension().is_none_or(|e| e != "kv") {
                    continue;
                }
                match read_header(&path) {
                    Some((salt, hash, len)) if salt == identity.salt && len as usize == identity.block_bytes => {
                        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                        let mtime = file
                            .metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH);
                        files.push((mtime, hash, size));
                    }
                    _ => report.foreign += 1,
                }
            }
        }
        files.sort();
        for (_, hash, size) in files {
            store.insert(hash, size);
        }
        report.found = store.index.len();
        Ok((store, report))
    }

    /// Whether block `hash` is here.
    pub fn contains(&self, hash: u64) -> bool {
        self.index.contains_key(&hash)
    }

    /// Every block hash here.
    pub fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.keys().copied()
    }

    /// Bytes the blocks here take.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Stores block `hash` (written once; a block already here is kept), evicting the oldest
    /// blocks beyond the budget.
    pub fn put(&mut self, hash: u64, payload: &[u8]) -> std::io::Result<PutOutcome> {
        if self.contains(hash) {
            return Ok(PutOutcome::default());
        }
        let path = self.path_of(hash);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension(format!("tmp{}-{}", std::process::id(), rand::random::<u32>()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&header(self.identity.salt, hash, payload))?;
            f.write_all(payload)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let size = (HEADER_BYTES + payload.len()) as u64;
        self.insert(hash, size);
        let evicted = self.evict_beyond_budget();
        Ok(PutOutcome { written: size, evicted })
    }

    /// Block `hash`'s payload; None when it is not here or its file is foreign, truncated or
    /// corrupt (such a file is removed).
    pub fn get(&mut self, hash: u64) -> Option<Vec<u8>> {
        if !self.contains(hash) {
            return None;
        }
        let path = self.path_of(hash);
        let read = (|| -> std::io::Result<Vec<u8>> {
            // One byte more than a block file holds: a longer file is caught, never read whole.
            let expected = (HEADER_BYTES + self.identity.block_bytes) as u64;
            let mut bytes = Vec::with_capacity(expected as usize);
            std::fs::File::open(&path)?.take(expected + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        })();
        let payload = read.ok().and_then(|bytes| self.checked_payload(hash, bytes));
        match payload {
            Some(p) => {
                self.refresh(hash);
                Some(p)
            }
            None => {
                tracing::warn!(file = %path.display(), "KV disk cache: block file is unreadable, truncated or corrupt; treated as a miss and removed");
                let _ = std::fs::remove_file(&path);
                self.forget(hash);
                None
            }
        }
    }

    fn checked_payload(&self, hash: u64, bytes: Vec<u8>) -> Option<Vec<u8>> {
        let h = Header::parse(bytes.get(..HEADER_BYTES)?)?;
        let ok = h.salt == self.identity.salt
            && h.hash == hash
            && h.len as usize == self.identity.block_bytes
            && bytes.len() == HEADER_BYTES + self.identity.block_bytes
            && xxhash_rust::xxh3::xxh3_64(&bytes[HEADER_BYTES..]) == h.checksum;
        ok.then(|| bytes[HEADER_BYTES..].to_vec())
    }

    fn path_of(&self, hash: u64) -> PathBuf {
        let name = format!("{hash:016x}");
        self.dir.join(&name[..2]).join(format!("{name}.kv"))
    }

    fn insert(&mut self, hash: u64, size: u64) {
        let age = self.next_age;
        self.next_age += 1;
        self.index.insert(hash, Entry { bytes: size, age });
        self.by_age.insert(age, hash);
        self.total += size;
    }

    fn refresh(&mut self, hash: u64) {
        if let Some(entry) = self.index.get(&hash).copied() {
            self.by_age.remove(&entry.age);
            self.total -= entry.bytes;
            self.index.remove(&hash);
            self.insert(hash, entry.bytes);
        }
    }

    fn forget(&mut self, hash: u64) {
        if let Some(entry) = self.index.remove(&hash) {
            self.by_age.remove(&entry.age);
            self.total -= entry.bytes;
        }
    }

    /// Pins (or unpins) the blocks `hashes`; returns how many of them are here. The pin set is
    /// saved beside the blocks (temp file + rename), so it outlives a restart.
    pub fn pin(&mut self, hashes: &[u64], pin: bool) -> std::io::Result<usize> {
        for h in hashes {
            if pin {
                self.pinned.insert(*h);
            } else {
                self.pinned.remove(h);
            }
        }
        let mut list: Vec<String> = self.pinned.iter().map(|h| format!("{h:016x}")).collect();
        list.sort();
        let path = self.dir.join(PINS_FILE);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, list.join("\n"))?;
        std::fs::rename(&tmp, &path)?;
        if !pin {
            self.evict_beyond_budget();
        }
        Ok(hashes.iter().filter(|h| self.contains(**h)).count())
    }

    fn evict_beyond_budget(&mut self) -> u64 {
        let mut evicted = 0;
        let mut kept = Vec::new();
        while self.total > self.max_bytes {
            let Some((age, hash)) = self.by_age.pop_first() else {
                break;
            };
            if self.pinned.contains(&hash) {
                kept.push((age, hash));
                continue;
            }
            if let Some(entry) = self.index.remove(&hash) {
                self.total -= entry.bytes;
            }
            let _ = std::fs::remove_file(self.path_of(hash));
            evicted += 1;
        }
        self.by_age.extend(kept);
        evicted
    }
}

fn header(salt: u64, hash: u64, payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&salt.to_le_bytes());
    h[24..32].copy_from_slice(&hash.to_le_bytes());
    h[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[40..48].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
    h
}

/// (salt, hash, payload length) of a file with this format's header.
fn read_header(path: &Path) -> Option<(u64, u64, u64)> {
    let mut head = [0u8; HEADER_BYTES];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    Header::parse(&head).map(|h| (h.salt, h.hash, h.len))
}

/// A block file's header fields, for a header of this format and version.
struct Header {
    salt: u64,
    hash: u64,
    len: u64,
    checksum: u64,
}

impl Header {
    fn parse(head: &[u8]) -> Option<Self> {
        let field = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        let ours = head.len() == HEADER_BYTES
            && &head[..8] == MAGIC
            && u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) == VERSION;
        ours.then(|| Self {
            salt: field(16),
            hash: field(24),
            len: field(32),
            checksum: field(40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mlxd-kvdisk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const ID: StoreIdentity = StoreIdentity {
        salt: 7,
        block_bytes: 16,
    };

    #[test]
    fn blocks_survive_a_reopen_and_foreign_ones_are_ignored() {
        let d = dir("reopen");
        let (mut s, _) = DiskStore::open(&d, ID, 1 << 20).expect("open");
        s.put(1, &[1; 16]).expect("put");
        s.put(2, &[2; 16]).expect("put");
        let other = StoreIdentity { salt: 8, ..ID };
        let (mut o, _) = DiskStore::open(&d.join("other-root"), other, 1 << 20).expect("open");
        o.put(3, &[3; 16]).expect("put");
        std::fs::rename(o.path_of(3), s.path_of(3).with_file_name("0000000000000003.kv")).expect("move");
        let (mut s, report) = DiskStore::open(&d, ID, 1 << 20).expect("reopen");
        assert_eq!(report, OpenReport { found: 2, foreign: 1 });
        assert_eq!(s.get(1), Some(vec![1; 16]));
        assert_eq!(s.get(3), None);
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn corrupt_or_truncated_files_are_misses() {
        let d = dir("corrupt");
        let (mut s, _) = DiskStore::open(&d, ID, 1 << 20).expect("open");
        s.put(1, &[1; 16]).expect("put");
        s.put(2, &[2; 16]).expect("put");
        let mut bytes = std::fs::read(s.path_of(1)).expect("read");
        bytes[HEADER_BYTES + 3] ^= 0xFF;
        std::fs::write(s.path_of(1), &bytes).expect("flip");
        let bytes = std::fs::read(s.path_of(2)).expect("read");
        std::fs::write(s.path_of(2), &bytes[..bytes.len() - 1]).expect("truncate");
        assert_eq!((s.get(1), s.get(2)), (None, None));
        assert!(!s.contains(1) && !s.contains(2));
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn pinned_blocks_outlive_the_budget_and_a_reopen() {
        let d = dir("pins");
        let each = (HEADER_BYTES + 16) as u64;
        let (mut s, _) = DiskStore::open(&d, ID, 2 * each).expect("open");
        s.put(1, &[1; 16]).expect("put");
        assert_eq!(s.pin(&[1, 9], true).expect("pin"), 1);
        s.put(2, &[2; 16]).expect("put");
        s.put(3, &[3; 16]).expect("put");
        assert!(
            s.contains(1) && !s.contains(2) && s.contains(3),
            "the oldest unpinned block went"
        );
        let (mut s, _) = DiskStore::open(&d, ID, 2 * each).expect("reopen");
        s.put(4, &[4; 16]).expect("put");
        assert!(s.contains(1) && s.contains(4) && !s.contains(3));
        s.pin(&[1], false).expect("unpin");
        s.put(5, &[5; 16]).expect("put");
        assert!(!s.contains(1), "unpinned blocks age out again");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn the_budget_evicts_the_oldest_first() {
        let d = dir("budget");
        let each = (HEADER_BYTES + 16) as u64;
        let (mut s, _) = DiskStore::open(&d, ID, 2 * each).expect("open");
        s.put(1, &[1; 16]).expect("put");
        s.put(2, &[2; 16]).expect("put");
        assert_eq!(s.get(1), Some(vec![1; 16]));
        let out = s.put(3, &[3; 16]).expect("put");
        assert_eq!(out.evicted, 1);
        assert!(s.contains(1) && !s.contains(2) && s.contains(3));
        assert_eq!(s.total_bytes(), 2 * each);
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
