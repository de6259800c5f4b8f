//! Network identity: which rhio nodes may talk to each other at all.
//!
//! Operators name a network (`network_id = "acme-prod"` in the config); every protocol on the
//! QUIC endpoint is bound to the 32-byte id derived here, so nodes configured with different
//! names cannot even complete a handshake. The id is not a secret.

/// Derives the 32-byte network id from the configured network name.
pub fn network_id(name: &str) -> [u8; 32] {
    *p2panda_core::Hash::digest(format!("rhio-network-v1:{name}")).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_distinct_stable_ids() {
        assert_eq!(network_id("a"), network_id("a"));
        assert_ne!(network_id("a"), network_id("b"));
        assert_ne!(network_id(""), [0; 32]);
    }
}
