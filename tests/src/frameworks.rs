//! Django and Flask sites as their users write them (issue 14's framework zygotes): for
//! tests/frameworks.rs and the framework cold-start benchmark. Debian's python3-django and
//! python3-flask.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{site_dir, User};

/// The WSGI entry points of [`django_site`] and [`flask_site`].
pub const DJANGO_ENTRY: &str = "mysite.wsgi:application";
pub const FLASK_ENTRY: &str = "app:application";

const DJANGO_VIEWS: &str = r#"import os

from django.http import HttpResponse
from django.template import engines


def index(request):
    page = engines["django"].from_string(
        "<form method=post>{% csrf_token %}</form> pid={{ pid }} ppid={{ ppid }}"
    )
    return HttpResponse(page.render({"pid": os.getpid(), "ppid": os.getppid()}, request))
"#;

const DJANGO_URLS: &str = r#"from django.urls import path

from . import views

urlpatterns = [path("", views.index)]
"#;

const FLASK_APP: &str = r#"import os

from flask import Flask

application = Flask(__name__)


@application.route("/")
def index():
    return "flask route pid=%d ppid=%d" % (os.getpid(), os.getppid())
"#;

fn chown_tree(dir: &Path, user: &User) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", user.uid, user.gid))
        .arg(dir)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown -R {}", dir.display());
}

/// `django-admin startproject mysite` in `base/<user>-<tag>/`, with a view at `/` that
/// renders a CSRF token and the worker's pid and parent pid, every host allowed, and
/// nothing else changed.
pub fn django_site(base: &Path, user: &User, tag: &str) -> PathBuf {
    let dir = site_dir(base, user, tag, "");
    std::fs::remove_file(dir.join("app.py")).unwrap();
    let out = Command::new("django-admin")
        .args(["startproject", "mysite"])
        .arg(&dir)
        .output()
        .expect("run django-admin (python3-django)");
    assert!(
        out.status.success(),
        "django-admin startproject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings = dir.join("mysite/settings.py");
    let text = std::fs::read_to_string(&settings).unwrap();
    let text = text.replace("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['*']");
    std::fs::write(&settings, text).unwrap();
    std::fs::write(dir.join("mysite/views.py"), DJANGO_VIEWS).unwrap();
    std::fs::write(dir.join("mysite/urls.py"), DJANGO_URLS).unwrap();
    chown_tree(&dir, user);
    dir
}

/// A Flask app in `base/<user>-<tag>/app.py` whose `/` route states the worker's pid and
/// parent pid.
pub fn flask_site(base: &Path, user: &User, tag: &str) -> PathBuf {
    site_dir(base, user, tag, FLASK_APP)
}

/// The token of the page's `{% csrf_token %}` field, if it renders one.
pub fn csrf_token(body: &str) -> Option<&str> {
    body.split(r#"name="csrfmiddlewaretoken" value=""#)
        .nth(1)?
        .split('"')
        .next()
}

/// Whether `body` is the Flask route's answer.
pub fn is_flask_page(body: &str) -> bool {
    body.starts_with("flask route ")
}
