//! Fuzzes what catch-up reads from GitHub: a hook's address, a `Link` header and a page of
//! the hook's delivery log. The input layout and the invariants are in
//! `hookrelay::catch_up::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hookrelay::catch_up::fuzz::delivery_log(data);
});
