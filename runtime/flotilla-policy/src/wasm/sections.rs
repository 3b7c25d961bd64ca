//! Sniffing a component binary for the custom section by which a component
//! built with the SDK says it serves argument-arena requests.

/// The custom section by which a component built with the SDK says it serves
/// argument-arena requests (`flotilla_sdk::arena`), and its content.
const ARENA_SECTION: &[u8] = b"flotilla-args-arena";
const ARENA_VERSION: &[u8] = b"v1";

/// Does the component (or a core module in it) carry the argument-arena
/// section? Walks the binary's sections, into nested modules and components.
pub(super) fn args_arena(bytes: &[u8]) -> bool {
    fn leb(bytes: &[u8], at: &mut usize) -> Option<usize> {
        let mut out = 0usize;
        for shift in (0..35).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            out |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }
    fn walk(bytes: &[u8], depth: u32) -> Option<bool> {
        if depth > 8 || bytes.get(..4)? != b"\0asm" {
            return None;
        }
        // Core modules are layer 0, components layer 1.
        let component = bytes.get(6..8)? == [1, 0];
        let mut at = 8;
        while at < bytes.len() {
            let id = bytes[at];
            at += 1;
            let len = leb(bytes, &mut at)?;
            let body = bytes.get(at..at.checked_add(len)?)?;
            at += len;
            match id {
                0 => {
                    let mut n = 0;
                    let name_len = leb(body, &mut n)?;
                    let name = body.get(n..n.checked_add(name_len)?)?;
                    if name == ARENA_SECTION && body.get(n + name_len..) == Some(ARENA_VERSION) {
                        return Some(true);
                    }
                }
                // Core module and component sections of a component.
                1 | 4 if component && walk(body, depth + 1) == Some(true) => {
                    return Some(true);
                }
                _ => {}
            }
        }
        Some(false)
    }
    walk(bytes, 0) == Some(true)
}
