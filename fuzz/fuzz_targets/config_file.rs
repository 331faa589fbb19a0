//! Fuzzes loading a configuration file: problems at lines the text has, or a configuration
//! that plans real webhooks. The invariants are in `hookrelay::config::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hookrelay::config::fuzz::config_file(data);
});
