//! `#[flotilla_sdk::policy]`: put it on `impl Policy for T { ... }` to export `T`
//! as the component's policy. It reads which hooks the impl defines, so the
//! runner knows which ones to call and applies its defaults to the rest.
//!
//! Arguments (all optional): `name = "..."` (default: the crate name),
//! `version = "..."` (default: the crate version).

use proc_macro::TokenStream;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ImplItem, ItemImpl, Lit, Meta, Token, parse_macro_input};

const HOOKS: [(&str, &str); 5] = [
    ("select", "Select"),
    ("plan", "Plan"),
    ("admit", "Admit"),
    ("evaluate", "Evaluate"),
    ("on_request", "OnRequest"),
];

#[proc_macro_attribute]
pub fn policy(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = match Punctuated::<Meta, Token![,]>::parse_terminated.parse(attr) {
        Ok(a) => a,
        Err(e) => return e.to_compile_error().into(),
    };
    let item_impl = parse_macro_input!(item as ItemImpl);

    let mut name = quote!(env!("CARGO_PKG_NAME"));
    let mut version = quote!(env!("CARGO_PKG_VERSION"));
    for arg in &args {
        let Meta::NameValue(nv) = arg else {
            return syn::Error::new_spanned(
                arg,
                "expected `name = \"...\"` or `version = \"...\"`",
            )
            .to_compile_error()
            .into();
        };
        let value = match &nv.value {
            Expr::Lit(l) => match &l.lit {
                Lit::Str(s) => s.value(),
                _ => {
                    return syn::Error::new_spanned(&nv.value, "expected a string")
                        .to_compile_error()
                        .into();
                }
            },
            other => {
                return syn::Error::new_spanned(other, "expected a string")
                    .to_compile_error()
                    .into();
            }
        };
        if nv.path.is_ident("name") {
            name = quote!(#value);
        } else if nv.path.is_ident("version") {
            version = quote!(#value);
        } else {
            return syn::Error::new_spanned(&nv.path, "unknown argument: use `name` or `version`")
                .to_compile_error()
                .into();
        }
    }

    match &item_impl.trait_ {
        Some((_, path, _)) if path.segments.last().is_some_and(|s| s.ident == "Policy") => {}
        _ => {
            return syn::Error::new_spanned(
                &item_impl.self_ty,
                "#[flotilla_sdk::policy] goes on `impl Policy for YourType { ... }`",
            )
            .to_compile_error()
            .into();
        }
    }

    let mut hooks = Vec::new();
    for item in &item_impl.items {
        if let ImplItem::Fn(f) = item {
            let fname = f.sig.ident.to_string();
            match HOOKS.iter().find(|(n, _)| *n == fname) {
                Some((_, variant)) => {
                    let v = syn::Ident::new(variant, proc_macro2::Span::call_site());
                    hooks.push(quote!(::flotilla_sdk::Hook::#v));
                }
                None => {
                    return syn::Error::new_spanned(
                        &f.sig.ident,
                        "not a policy hook: expected select, plan, admit, evaluate or on_request",
                    )
                    .to_compile_error()
                    .into();
                }
            }
        }
    }

    let ty = &item_impl.self_ty;
    quote! {
        #item_impl

        impl ::flotilla_sdk::Describe for #ty {
            const NAME: &'static str = #name;
            const VERSION: &'static str = #version;
            const HOOKS: &'static [::flotilla_sdk::Hook] = &[#(#hooks),*];
        }

        ::flotilla_sdk::__export_policy!(#ty);
    }
    .into()
}
