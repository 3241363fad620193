// Empty on purpose: lets the agent name this crate as a build-dependency, so cargo rebuilds
// the agent (whose build.rs compiles the BPF object) when the programs change.
#![no_std]
