//! Static `__shared__` variables need one copy per block, refilled with NaN at the start of
//! every block, placed no better aligned than declared, and counted towards the launch's
//! shared memory. The compiler cannot collect them by itself (a named section cannot hold both
//! the variables of inline functions and the others), so each source is preprocessed, every
//! `__shared__` declaration becomes storage held and registered by the runtime
//! (`SharedHolder`) with a reference of the declared name, and the result is compiled. Line
//! markers keep diagnostics on the original lines.

use std::fmt::Write as _;

/// What `cuda_emu.h` defines `__shared__` as; it fails to compile wherever it is not rewritten.
const MARKER: &str = "CCPL_EMU_SHARED_DECLARATION_NOT_REWRITTEN_BY_BUILD_RS";

/// Rewrites every `MARKER <declaration>;` of preprocessed C++ as a struct holding the
/// declaration, its storage (`SharedHolder`, which registers it and places it at no more than
/// its alignment) and a reference to each declared name:
/// `struct S0 { T a[n]; }; static SharedHolder<S0> h0; auto& a = h0.use().a;`. Inside a function
/// `use()` runs each time the declaration is reached, counting the variable's bytes towards
/// the launch's shared memory; at namespace scope the reference is bound once (`get()`).
pub fn rewrite_shared(text: &str) -> Result<String, String> {
    let mut code = String::with_capacity(text.len());
    let mut rest = text;
    let mut count = 0;
    while let Some(at) = find_word(rest, MARKER) {
        let (before, after) = rest.split_at(at);
        let after = &after[MARKER.len()..];
        let location = location_of(text, text.len() - rest.len() + at);
        let end = statement_end(after)
            .ok_or_else(|| format!("{location}: a __shared__ declaration without its ';'"))?;
        let declaration = &after[..end];
        let prefix = statement_prefix(before);
        if words(prefix).any(|w| w == "extern") {
            return Err(format!(
                "{location}: `extern __shared__` (dynamic shared memory): use CCPL_DYNAMIC_SHARED(type, name)"
            ));
        }
        let in_function = in_function(&text[..text.len() - rest.len() + at]);
        code.push_str(&before[..before.len() - prefix.len()]);
        let attributes = match find_word(prefix, "static") {
            Some(i) => format!("{}{}", &prefix[..i], &prefix[i + "static".len()..]),
            None => prefix.to_string(),
        };
        let names = declared_names(declaration)
            .map_err(|e| format!("{location}: `__shared__{declaration};`: {e}"))?;
        write!(
            code,
            "struct ccpl_emu_shared_{count} {{ {attributes} {declaration}; }}; \
             static ::ccpl_emu::SharedHolder<ccpl_emu_shared_{count}> ccpl_emu_holder_{count};"
        )
        .unwrap();
        let access = if in_function { "use" } else { "get" };
        for name in names {
            write!(
                code,
                " auto& {name} = ccpl_emu_holder_{count}.{access}().{name};"
            )
            .unwrap();
        }
        count += 1;
        rest = &after[end + 1..];
    }
    code.push_str(rest);
    Ok(code)
}

/// Whether the end of `text` lies inside a function body: inside a brace that is not a
/// namespace's or an `extern "C"` block's.
fn in_function(text: &str) -> bool {
    let mut open: Vec<bool> = Vec::new(); // per open brace: whether it is a function body's
    let mut last_words: Vec<&str> = Vec::new();
    let mut word_start = None;
    for (i, c) in text.char_indices() {
        if is_ident(c) {
            word_start.get_or_insert(i);
            continue;
        }
        if let Some(start) = word_start.take() {
            last_words.push(&text[start..i]);
        }
        match c {
            '{' => {
                let scope = last_words
                    .iter()
                    .rev()
                    .take(2)
                    .any(|w| *w == "namespace" || *w == "extern");
                open.push(!scope);
                last_words.clear();
            }
            '}' => {
                open.pop();
                last_words.clear();
            }
            ';' | ')' | '(' => last_words.clear(),
            _ => {}
        }
    }
    open.contains(&true)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Byte offset of `word` in `text` as a whole identifier.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(word).map(|i| i + from) {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_ident(c)).filter(|w| !w.is_empty())
}

/// "file:line" of byte `offset` of preprocessed text, from its last line marker.
fn location_of(text: &str, offset: usize) -> String {
    let mut file = "?".to_string();
    let mut line = 0usize;
    for l in text[..offset].split('\n') {
        let mut parts = l.splitn(3, ' ');
        if let (Some("#"), Some(n), Some(name)) = (parts.next(), parts.next(), parts.next())
            && let Ok(n) = n.parse::<usize>()
        {
            line = n;
            file = name.split('"').nth(1).unwrap_or(name).to_string();
            continue;
        }
        line += 1;
    }
    format!("{file}:{}", line.saturating_sub(1))
}

/// The index of the `;` that ends the statement starting at `text`, outside brackets.
fn statement_end(text: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ';' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// The part of the current statement before the marker (`static`, `extern`, attributes).
fn statement_prefix(before: &str) -> &str {
    let start = before.rfind([';', '{', '}']).map_or(0, |i| i + 1);
    &before[start..]
}

/// The names a declaration (`float a[4][4], b`) declares, in order.
fn declared_names(declaration: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    for (i, declarator) in split_top_level(declaration).into_iter().enumerate() {
        let declarator = strip_trailing_attributes(declarator.trim());
        // The name is the last identifier before the first array bound.
        let head = match declarator.find('[') {
            Some(j) => &declarator[..j],
            None => declarator,
        };
        let head = head.trim_end();
        let start = head.rfind(|c: char| !is_ident(c)).map_or(0, |j| j + 1);
        let name = &head[start..];
        let has_type = i > 0 || words(&head[..start]).next().is_some();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || !has_type {
            return Err(format!("cannot find the declared name in `{declarator}`"));
        }
        names.push(name);
    }
    Ok(names)
}

/// `declaration` split at its commas that are outside brackets and template arguments.
fn split_top_level(declaration: &str) -> Vec<&str> {
    let (mut parts, mut start) = (Vec::new(), 0);
    let (mut brackets, mut angles) = (0i32, 0i32);
    for (i, c) in declaration.char_indices() {
        match c {
            '(' | '[' | '{' => brackets += 1,
            ')' | ']' | '}' => brackets -= 1,
            '<' if brackets == 0 => angles += 1,
            '>' if brackets == 0 => angles -= 1,
            ',' if brackets == 0 && angles == 0 => {
                parts.push(&declaration[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&declaration[start..]);
    parts
}

/// `x __attribute__((aligned(16)))` without its attributes.
fn strip_trailing_attributes(mut declarator: &str) -> &str {
    while declarator.ends_with(')') {
        let mut depth = 0i32;
        let mut open = None;
        for (i, c) in declarator.char_indices().rev() {
            match c {
                ')' => depth += 1,
                '(' => {
                    depth -= 1;
                    if depth == 0 {
                        open = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(open) = open else { break };
        let Some(head) = declarator[..open].trim_end().strip_suffix("__attribute__") else {
            break;
        };
        declarator = head.trim_end();
    }
    declarator
}
