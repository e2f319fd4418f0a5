//! The `api_keys` table: hashes of the keys the API accepts.

use rusqlite::params;

use super::{SqlContext, Store, StoreError};

impl Store {
    pub fn add_api_key(
        &self,
        name: &str,
        key_hash: &str,
        hint: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "INSERT OR IGNORE INTO api_keys (name, key_hash, hint, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, key_hash, hint, now_ms],
            )
            .op("adding an API key")?;
        Ok(n == 1)
    }

    pub fn api_key_hashes(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT key_hash FROM api_keys")
            .op("listing API keys")?;
        let rows = stmt
            .query_map([], |r| r.get(0))
            .op("listing API keys")?
            .collect::<Result<Vec<String>, _>>()
            .op("listing API keys")?;
        Ok(rows)
    }
}
