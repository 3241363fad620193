//! Files the programs read from their own directories: configuration, state, and the
//! deployment's token and machine stores. Each target writes the input where the real
//! loader looks and calls the loader, so the bounds and checks it applies are the ones
//! fuzzed.

use std::path::{Path, PathBuf};

use ripcord_agent::replicate::{config::AgentConfig, state::AgentState};
use ripcord_master_target::state::ApplyState;
use ripcord_process_server::{config::PsConfig, registry::Registry};
use ripcord_transport::pki::{MachineId, MachineStore, Token, TokenStore};

use crate::scratch;

/// Writes `data` as `name` in a fresh scratch directory and returns the file's path.
fn put(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).expect("writing a scratch file");
    path
}

/// The agent's `agent.toml` through `AgentConfig::load`: a configuration it accepts,
/// written back as TOML, loads again (validation included) to the same TOML.
pub fn agent_config(data: &[u8]) {
    scratch(|dir| {
        let path = put(dir, "agent.toml", data);
        let Ok(cfg) = AgentConfig::load(&path, true) else {
            return;
        };
        crate::accepted();
        let text = toml::to_string(&cfg).expect("a loaded config serializes");
        let path = put(dir, "agent.toml", text.as_bytes());
        let again = AgentConfig::load(&path, true).expect("a written-back config loads");
        assert_eq!(toml::to_string(&again).expect("serializes"), text);
    });
}

/// The agent's `state.json` through `AgentState::load`: a state it accepts, saved, loads
/// to the same value; the pinned escrow key is read without panicking.
pub fn agent_state(data: &[u8]) {
    scratch(|dir| {
        put(dir, "state.json", data);
        let Ok(state) = AgentState::load(dir) else {
            return;
        };
        crate::accepted();
        let _ = state.pinned_escrow_key();
        state.save(dir).expect("saving a loaded state");
        assert_eq!(AgentState::load(dir).expect("a saved state loads"), state);
    });
}

/// The process server's `ps.toml` through `PsConfig::load`, as [`agent_config`].
pub fn ps_config(data: &[u8]) {
    scratch(|dir| {
        let path = put(dir, "ps.toml", data);
        let Ok(cfg) = PsConfig::load(&path) else {
            return;
        };
        crate::accepted();
        let text = toml::to_string(&cfg).expect("a loaded config serializes");
        let path = put(dir, "ps.toml", text.as_bytes());
        let again = PsConfig::load(&path).expect("a written-back config loads");
        assert_eq!(toml::to_string(&again).expect("serializes"), text);
    });
}

/// The process server's disk registry (`disks.json`) through `Registry::open`.
pub fn ps_registry(data: &[u8]) {
    scratch(|dir| {
        let path = put(dir, "disks.json", data);
        if let Ok(reg) = Registry::open(&path) {
            crate::accepted();
            let _ = reg.get(&ripcord_proto::DiskId(*b"fuzz-disk-000001"));
        }
    });
}

/// A master-target state file through `ApplyState::load` (size bound, format version):
/// a state it accepts, written back, loads to the same value.
pub fn mt_state(data: &[u8]) {
    scratch(|dir| {
        let path = put(dir, "state.json", data);
        let Ok(Some(state)) = ApplyState::load(&path) else {
            return;
        };
        crate::accepted();
        let _ = state.consistent();
        let text = serde_json::to_vec_pretty(&state).expect("a loaded state serializes");
        let path = put(dir, "state.json", &text);
        let again = ApplyState::load(&path).expect("a written-back state loads");
        assert_eq!(again, Some(state));
    });
}

/// The deployment's bootstrap token store (`tokens`) through `TokenStore::load`: a store
/// it accepts is rewritten by an update, and rewriting that again gives the same bytes
/// (what is written reads back to the same entries).
pub fn token_store(data: &[u8]) {
    scratch(|dir| {
        let path = put(dir, ripcord_transport::pki::TOKEN_STORE_FILE, data);
        let Ok(store) = TokenStore::load(dir) else {
            return;
        };
        crate::accepted();
        let token = Token::parse("abcdef.0123456789abcdef").expect("a valid token");
        let _ = store.verify(&token, std::time::SystemTime::UNIX_EPOCH);
        let _ = store.uses(token.id());
        // `revoke` rewrites the whole file from what it read.
        store.revoke("zzzzzz").expect("rewriting a loaded store");
        let first = std::fs::read(&path).expect("reading the store");
        store.revoke("zzzzzz").expect("rewriting a rewritten store");
        assert_eq!(std::fs::read(&path).expect("reading the store"), first);
    });
}

/// The deployment's machine store (`machines`) through `MachineStore::open`: the
/// machines listed are the same after the store rewrites the file.
pub fn machine_store(data: &[u8]) {
    scratch(|dir| {
        put(dir, ripcord_transport::pki::MACHINE_STORE_FILE, data);
        let Ok(store) = MachineStore::open(dir) else {
            return;
        };
        crate::accepted();
        let Ok(listed) = store.list() else {
            return;
        };
        let nobody = MachineId::new("fuzz-nobody").expect("a valid machine id");
        store.remove(&nobody).expect("rewriting a loaded store");
        assert_eq!(store.list().expect("a rewritten store lists"), listed);
    });
}
