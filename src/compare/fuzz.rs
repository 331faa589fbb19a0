//! The fuzzing entry point for what a forge answers when asked which files a push changed,
//! shared by `fuzz/` (cargo-fuzz) and a smoke test that runs on every `cargo test`.
//!
//! Input layout: the first byte picks the forge, the first line (after it) is the API root
//! as configured, the rest is one page of the forge's answer. Whatever the input, reading
//! it must return, never panic; a next page is always a path on the API root's host (the
//! token goes with it), and Bitbucket Data Center's keeps the first request's path.

use super::{Forge, first_path, read_page};

const FORGES: [Forge; 5] = [
    Forge::Github,
    Forge::Gitea,
    Forge::Gitlab,
    Forge::BitbucketCloud,
    Forge::BitbucketServer,
];

/// Drives the reader with arbitrary bytes and checks its invariants.
pub fn answer(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let forge = FORGES[usize::from(pick) % FORGES.len()];
    let text = String::from_utf8_lossy(rest);
    let (api_url, body) = text.split_once('\n').unwrap_or((&text, ""));
    let first = first_path(
        forge,
        "acme/app",
        "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    )
    .expect("a well-formed repository and commits make a path");
    let Ok(page) = read_page(forge, body.as_bytes(), &first, api_url) else {
        return;
    };
    if let Some(next) = &page.next {
        // The next request goes to the API root's host, whatever the path says.
        assert!(next.starts_with('/'), "{next}");
        let root: Option<http::Uri> = api_url.parse().ok();
        let joined: Option<http::Uri> = format!("{api_url}{next}").parse().ok();
        if let (Some(root), Some(joined)) = (root, joined) {
            let host = |uri: &http::Uri| uri.authority().map(|a| a.as_str().to_ascii_lowercase());
            assert_eq!(host(&joined), host(&root), "{api_url} {next}");
        }
        match forge {
            Forge::BitbucketServer => assert!(next.starts_with(&first), "{next}"),
            Forge::BitbucketCloud => {}
            _ => panic!("{forge:?} has no next page: {next}"),
        }
    }
}

#[cfg(test)]
mod tests {
    /// A deterministic pseudo-random run over mutated seeds: a smoke test, not a fuzzer.
    #[test]
    fn the_compare_readers_survive_mutated_inputs() {
        let seeds: [&[u8]; 5] = [
            b"\x00https://api.github.com\n{\"files\":[{\"filename\":\"a\",\"previous_filename\":\"b\"}]}",
            b"\x01https://codeberg.org/api/v1\n{\"total_commits\":1,\"commits\":[{\"files\":[{\"filename\":\"x\",\"status\":\"added\"}]}]}",
            b"\x02https://gitlab.com/api/v4\n{\"diffs\":[{\"old_path\":\"a\",\"new_path\":\"b\"}],\"compare_timeout\":false}",
            b"\x03https://api.bitbucket.org/2.0\n{\"values\":[{\"old\":null,\"new\":{\"path\":\"a\"}}],\"next\":\"https://api.bitbucket.org/2.0/repositories/acme/app/diffstat/x?page=2\"}",
            b"\x04https://bb.example.com\n{\"isLastPage\":false,\"nextPageStart\":25,\"values\":[{\"path\":{\"toString\":\"a\"},\"srcPath\":{\"toString\":\"b\"}}]}",
        ];
        let mut mutations = crate::mutations::Mutations::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            mutations.mutate(&mut input, 1, 8, crate::mutations::Shorten::Byte);
            super::answer(&input);
        }
    }
}
