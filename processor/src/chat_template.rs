//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it with Jinja2.
//!
//! Hugging Face templates are written for Python Jinja2, so the environment matches its settings
//! (`trim_blocks`, `lstrip_blocks`, loop controls), lets string methods such as `.strip()` through
//! minijinja-contrib's pycompat callback, and provides the two globals transformers adds:
//! `raise_exception(msg)` and `strftime_now(fmt)`.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, as the template sees it (`message['role']`, `message['content']`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template has a syntax error: {0}")]
    Syntax(#[source] minijinja::Error),
    #[error("the chat template failed to render: {0}")]
    Render(#[source] minijinja::Error),
    /// The template itself refused the conversation (e.g. roles that do not alternate).
    #[error("the chat template raised an exception: {0}")]
    Raised(String),
}

/// What `raise_exception` attaches to the minijinja error, so `render` can tell it apart.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template`; a syntax error is reported here, not at the first request.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // Jinja2 as transformers configures it; without these, whitespace differs from the
        // prompts the model was trained on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(
                    minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                        .with_source(Raised(msg)),
                )
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime(&fmt, unix_now()));
        env.add_template_owned(TEMPLATE_NAME, template.to_string())
            .map_err(TemplateError::Syntax)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TemplateError::Render)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| match raised_message(&e) {
                Some(msg) => TemplateError::Raised(msg),
                None => TemplateError::Render(e),
            })
    }
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(Raised(msg)) = err.downcast_ref::<Raised>() {
            return Some(msg.clone());
        }
        source = err.source();
    }
    None
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A small `strftime` for the dates templates print (Llama 3.1: `"%d %b %Y"`), in UTC since
/// the server's local zone means nothing to a remote client. Unknown specifiers stay verbatim.
fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let month_name = MONTHS[(month - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' \
        + message['content'] + '<|im_end|>\n' }}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(content: &str) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    #[test]
    fn renders_messages_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t.render(&[user("hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[user("hi")], false).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn passes_special_tokens_and_python_string_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}\
            {% if m.role.startswith('us') %}!{% endif %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(t.render(&[user("  hey ")], false).unwrap(), "<s>HEY!</s>");
    }

    #[test]
    fn trims_block_whitespace_like_transformers() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&[user("a"), user("b")], false).unwrap(),
            "    a\n    b\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_raised_error() {
        let src = "{% if messages[0]['role'] != 'system' %}\
            {{ raise_exception('Conversation roles must start with system') }}{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t.render(&[user("hi")], true).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Raised(m) if m == "Conversation roles must start with system")
        );
        assert!(err
            .to_string()
            .contains("raised an exception: Conversation roles"));
    }

    #[test]
    fn syntax_and_render_errors_are_told_apart() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)), "{err}");
        assert!(err.to_string().contains("syntax error"));
        let t = ChatTemplate::new("{{ messages[0].content + 1 }}", None, None).unwrap();
        let err = t.render(&[user("hi")], false).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-23 14:05:09 UTC, a Tuesday.
        let t = 1_721_743_509;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(
            strftime("%A %B %e, %y %H:%M:%S %% %Q", t),
            "Tuesday July 23, 24 14:05:09 % %Q"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap().len(), 4);
    }
}
