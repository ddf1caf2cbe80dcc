//! The memory store's counters written to a file and read back (`--memory-snapshot`), so a
//! restart — a rollout, an OOM kill, a node drain — does not hand every client a fresh
//! quota: with hour and day windows that would be most of a day's limit given away.
//!
//! The file holds the store's key-hash seed (the table keeps no key strings, only their
//! hashes, so a new process must hash with the same seed to find its counters) and every
//! live counter: its key hash, when it stops mattering, and its algorithm state. Decisions
//! use wall-clock time, so a state read back is as valid as when it was written; counters
//! that expired in between are skipped.
//!
//! Layout, little-endian: `MAGIC`, the seed (u64), the entries, their count (u64), and an
//! xxh3-64 of everything before it. A file that is cut short or altered fails the checksum
//! and is refused whole rather than half read. An entry is the key (u128), the expiry
//! (u64), a tag byte and the state's fields (see `write_state`).

use std::path::Path;

use crate::algorithm::leaky_bucket::Bucket;
use crate::algorithm::penalty::PenaltyState;
use crate::algorithm::sliding_log::Log;
use crate::algorithm::{CounterState, WindowState};

const MAGIC: &[u8; 8] = b"MLSNAP01";
/// The seed after the magic; the count and the checksum at the end.
const HEADER: usize = MAGIC.len() + 8;
const TRAILER: usize = 16;

const TAG_WINDOW: u8 = 1;
const TAG_BUCKET: u8 = 2;
const TAG_PENALTY: u8 = 3;
const TAG_LOG: u8 = 4;
const TAG_LEAKY: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a meshlimit counter snapshot, or damaged ({why})")]
    Damaged { path: String, why: String },
}

/// One saved counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: u128,
    pub expires_at_millis: u64,
    pub state: CounterState,
}

/// Builds a snapshot: the seed, then entries as the store hands them over, shard by shard.
pub struct Writer {
    bytes: Vec<u8>,
    count: u64,
}

impl Writer {
    pub fn new(seed: u64) -> Self {
        let mut bytes = Vec::with_capacity(1 << 16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&seed.to_le_bytes());
        Self { bytes, count: 0 }
    }

    /// Adds one counter; an empty state is nothing to keep.
    pub fn push(&mut self, key: u128, expires_at_millis: u64, state: &CounterState) {
        if *state == CounterState::Empty {
            return;
        }
        self.bytes.extend_from_slice(&key.to_le_bytes());
        self.bytes
            .extend_from_slice(&expires_at_millis.to_le_bytes());
        write_state(&mut self.bytes, state);
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The finished file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&self.count.to_le_bytes());
        let checksum = xxhash_rust::xxh3::xxh3_64(&self.bytes);
        self.bytes.extend_from_slice(&checksum.to_le_bytes());
        self.bytes
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so a crash
/// mid-write leaves the previous snapshot, never a torn one.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let io = |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = std::path::PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io)
}

/// A snapshot's seed, and its entries one at a time, after the whole file was checked.
pub struct Reader<'b> {
    pub seed: u64,
    rest: &'b [u8],
    left: u64,
}

impl<'b> Reader<'b> {
    /// Checks `bytes` (read from `path`, named in errors) and reads its header.
    pub fn new(path: &Path, bytes: &'b [u8]) -> Result<Self, SnapshotError> {
        let damaged = |why: &str| SnapshotError::Damaged {
            path: path.display().to_string(),
            why: why.to_owned(),
        };
        if bytes.len() < HEADER + TRAILER || !bytes.starts_with(MAGIC) {
            return Err(damaged("it does not start as one"));
        }
        let (body, checksum) = bytes
            .split_at_checked(bytes.len() - 8)
            .ok_or_else(|| damaged("it does not start as one"))?;
        if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != checksum {
            return Err(damaged("its checksum does not match: cut short or altered"));
        }
        let mut header = Cursor(body.get(MAGIC.len()..).unwrap_or_default());
        let seed = header.u64().ok_or_else(|| damaged("no seed"))?;
        let (entries, count) = body
            .get(HEADER..)
            .and_then(|rest| rest.split_at_checked(rest.len().checked_sub(8)?))
            .ok_or_else(|| damaged("no count"))?;
        let left = Cursor(count).u64().ok_or_else(|| damaged("no count"))?;
        Ok(Self {
            seed,
            rest: entries,
            left,
        })
    }

    /// The next entry; `Err` names what does not parse (only a file written by another
    /// version could get past the checksum so).
    pub fn next_entry(&mut self) -> Option<Result<Entry, String>> {
        if self.left == 0 {
            return (!self.rest.is_empty())
                .then(|| Err(format!("{} bytes after the last entry", self.rest.len())));
        }
        self.left -= 1;
        let mut cursor = Cursor(self.rest);
        let entry = read_entry(&mut cursor);
        self.rest = cursor.0;
        Some(entry.ok_or_else(|| "an entry does not parse".to_owned()))
    }
}

fn write_state(out: &mut Vec<u8>, state: &CounterState) {
    match state {
        CounterState::Empty => {}
        CounterState::Window(w) => {
            out.push(TAG_WINDOW);
            for value in [w.window, w.current, w.previous] {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        CounterState::Bucket { tat_micros } => {
            out.push(TAG_BUCKET);
            out.extend_from_slice(&tat_micros.to_le_bytes());
        }
        CounterState::Penalty(p) => {
            out.push(TAG_PENALTY);
            out.extend_from_slice(&p.window.to_le_bytes());
            out.extend_from_slice(&p.rejections.to_le_bytes());
            out.extend_from_slice(&p.blocked_until_millis.to_le_bytes());
        }
        CounterState::Log(log) => {
            out.push(TAG_LOG);
            let entries: Vec<(u64, u64)> = log.entries().collect();
            out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            for (at, hits) in entries {
                out.extend_from_slice(&at.to_le_bytes());
                out.extend_from_slice(&hits.to_le_bytes());
            }
        }
        CounterState::Leaky(bucket) => {
            out.push(TAG_LEAKY);
            out.extend_from_slice(&bucket.level.to_le_bytes());
            out.extend_from_slice(&bucket.updated_millis.to_le_bytes());
        }
    }
}

fn read_entry(cursor: &mut Cursor<'_>) -> Option<Entry> {
    let key = cursor.u128()?;
    let expires_at_millis = cursor.u64()?;
    let state = match cursor.u8()? {
        TAG_WINDOW => CounterState::Window(WindowState {
            window: cursor.u64()?,
            current: cursor.u64()?,
            previous: cursor.u64()?,
        }),
        TAG_BUCKET => CounterState::Bucket {
            tat_micros: cursor.u64()?,
        },
        TAG_PENALTY => CounterState::Penalty(PenaltyState {
            window: cursor.u64()?,
            rejections: cursor.u32()?,
            blocked_until_millis: cursor.u64()?,
        }),
        TAG_LOG => {
            let len = usize::try_from(cursor.u64()?).ok()?;
            // Each entry is 16 bytes: a length the file cannot hold is not believed.
            if len > cursor.0.len() / 16 {
                return None;
            }
            let mut entries = Vec::with_capacity(len);
            for _ in 0..len {
                entries.push((cursor.u64()?, cursor.u64()?));
            }
            CounterState::Log(Log::from_entries(entries))
        }
        TAG_LEAKY => CounterState::Leaky(Bucket {
            level: cursor.u128()?,
            updated_millis: cursor.u64()?,
        }),
        _ => return None,
    };
    Some(Entry {
        key,
        expires_at_millis,
        state,
    })
}

/// Little-endian numbers off the front of a byte slice.
struct Cursor<'b>(&'b [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn u128(&mut self) -> Option<u128> {
        self.take().map(u128::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_kind_of_state() -> Vec<CounterState> {
        vec![
            CounterState::Window(WindowState {
                window: 29_000_123,
                current: 7,
                previous: 41,
            }),
            CounterState::Bucket {
                tat_micros: 1_765_000_000_123_456,
            },
            CounterState::Penalty(PenaltyState {
                window: 12,
                rejections: 3,
                blocked_until_millis: 1_765_000_060_000,
            }),
            CounterState::Log(Log::from_entries(vec![(1_000, 2), (1_500, 1), (1_900, 4)])),
            CounterState::Leaky(Bucket {
                level: u128::from(u64::MAX) * 3,
                updated_millis: 1_765_000_000_999,
            }),
        ]
    }

    fn written(states: &[CounterState]) -> Vec<u8> {
        let mut writer = Writer::new(0xfeed);
        for (i, state) in states.iter().enumerate() {
            writer.push(i as u128 + (1 << 100), 5_000 + i as u64, state);
        }
        writer.push(99, 1, &CounterState::Empty);
        assert_eq!(
            writer.count(),
            states.len() as u64,
            "empty states are skipped"
        );
        writer.finish()
    }

    #[test]
    fn every_state_reads_back_as_written() {
        let states = every_kind_of_state();
        let bytes = written(&states);
        let mut reader = Reader::new(Path::new("s"), &bytes).unwrap();
        assert_eq!(reader.seed, 0xfeed);
        let mut read = Vec::new();
        while let Some(entry) = reader.next_entry() {
            read.push(entry.unwrap());
        }
        let expected: Vec<Entry> = (states.iter().enumerate())
            .map(|(i, state)| Entry {
                key: i as u128 + (1 << 100),
                expires_at_millis: 5_000 + i as u64,
                state: state.clone(),
            })
            .collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_file_cut_short_or_altered_is_refused_whole() {
        let bytes = written(&every_kind_of_state());
        let cut = &bytes[..bytes.len() - 20];
        let altered = {
            let mut b = bytes.clone();
            b[HEADER + 3] ^= 1;
            b
        };
        for (what, bytes) in [
            ("cut", cut),
            ("altered", &altered[..]),
            ("empty", &[][..]),
            (
                "foreign",
                &b"MZ\x90\x00 not a snapshot at all, long enough"[..],
            ),
        ] {
            let error = Reader::new(Path::new("/var/lib/m/counters"), bytes)
                .err()
                .unwrap_or_else(|| panic!("{what} was accepted"))
                .to_string();
            assert!(
                error.starts_with("/var/lib/m/counters: not a meshlimit counter snapshot"),
                "{what}: {error}"
            );
        }
    }

    /// `body` between a real header and a trailer whose count and checksum fit it: the
    /// entries' parser sees any bytes at all.
    fn sealed(body: &[u8], count: u64) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&count.to_le_bytes());
        let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    proptest! {
        /// Entries that pass the checksum but are not what this version writes (another
        /// version's, or made by hand) give an error or entries, never a panic, and never
        /// more entries than the bytes can hold.
        #[test]
        fn any_sealed_bytes_are_read_without_panicking(
            body in prop::collection::vec(any::<u8>(), 0..400),
            count in prop_oneof![0u64..8, Just(u64::MAX)],
        ) {
            let bytes = sealed(&body, count);
            let mut reader = Reader::new(Path::new("s"), &bytes).unwrap();
            let mut entries = 0;
            while let Some(entry) = reader.next_entry() {
                if entry.is_err() {
                    break;
                }
                entries += 1;
            }
            // The smallest entry: key, expiry, tag and one u64.
            prop_assert!(entries <= body.len() / (16 + 8 + 1 + 8));
        }
    }
}
