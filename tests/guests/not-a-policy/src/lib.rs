//! A component that exports `describe` and `greet` but none of the policy hooks.

wit_bindgen::generate!({
    inline: "
        package test:not-a-policy;
        world other {
            export describe: func() -> string;
            export greet: func(name: string) -> string;
        }
    ",
});

struct Other;

impl Guest for Other {
    fn describe() -> String {
        "not a policy".into()
    }
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Other);
