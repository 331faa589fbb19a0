//! Fuzzes the gateway's trigger-call parser over all four encodings and both endpoints.
//! The input layout and the invariants are in `hookrelay::gateway::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    futures_executor::block_on(hookrelay::gateway::fuzz::trigger_call(data));
});
