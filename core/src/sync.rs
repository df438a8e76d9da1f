//! Locking that survives a panic elsewhere.
//!
//! Backend panics are caught and returned as [`Error::Panic`](crate::Error::Panic), so a
//! thread may panic while holding one of tern's locks. Everything tern guards with a
//! mutex (caches, pools, counters) stays valid whatever point a panic stopped at, so a
//! poisoned lock is taken as it is rather than turning every later call into a panic.
//! Public for the crates over tern (flows, bindings), whose guarded state follows the same
//! rule.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, ignoring poisoning (see the module docs).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `lock`, ignoring poisoning.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `lock`, ignoring poisoning.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
