//! The one way the relay makes its sled database durable.
//!
//! sled 0.34 can deadlock when several flushes of one database run at the
//! same time (sled issue #1308: fixed on sled's main branch, never released);
//! the relay benchmark hit it with concurrent `flush_async` calls, after which
//! DHCP stopped answering and even shutdown hung. So every flush in the relay
//! goes through here: one at a time (a process-wide lock), the blocking
//! `flush` on a blocking thread so async tasks never stall.

use std::sync::Mutex;

static FLUSH: Mutex<()> = Mutex::new(());

/// Flush from synchronous code (start-up, tests).
pub fn flush_blocking(tree: &sled::Tree) -> Result<(), sled::Error> {
    let _serial = FLUSH.lock().unwrap_or_else(|p| p.into_inner());
    tree.flush()?;
    Ok(())
}

/// Flush from async code: waits on a blocking thread, never on the runtime.
pub async fn flush(tree: sled::Tree) -> Result<(), sled::Error> {
    tokio::task::spawn_blocking(move || flush_blocking(&tree))
        .await
        .map_err(|e| sled::Error::Io(std::io::Error::other(e)))?
}

/// Flush the whole database (a tree flush covers it; any tree will do).
pub async fn flush_db(db: &sled::Db) -> Result<(), sled::Error> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let _serial = FLUSH.lock().unwrap_or_else(|p| p.into_inner());
        db.flush().map(|_| ())
    })
    .await
    .map_err(|e| sled::Error::Io(std::io::Error::other(e)))?
}

/// Open a sled database, waiting up to `within` for the file lock of an
/// earlier handle in this process: sled releases it from a background thread
/// after the last `Db` is dropped, so an immediate reopen (tests that
/// simulate a restart) can fail with "could not acquire lock".
pub fn open_retrying(
    path: &std::path::Path,
    within: std::time::Duration,
) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match sled::open(path) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Tests: open (or reopen, after a simulated restart) a database.
#[cfg(test)]
pub(crate) fn test_db(path: impl AsRef<std::path::Path>) -> sled::Db {
    open_retrying(path.as_ref(), std::time::Duration::from_secs(10)).expect("open sled")
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_flushes_complete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                t.insert(i.to_be_bytes(), vec![1u8; 64]).unwrap();
                super::flush(t).await.unwrap();
            }));
        }
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap();
        }
        super::flush_db(&db).await.unwrap();
    }
}
