//! Fuzzes the gitlab webhook parser and verifier; see `hookrelay::sources::fuzz`.
#![no_main]

use hookrelay::event::Provider;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hookrelay::sources::fuzz::webhook(Provider::Gitlab, data);
});
