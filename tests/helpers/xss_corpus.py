"""Markup that would run code or change the page if it were ever rendered as HTML: raw HTML, Markdown
links and images, SVG, MathML, entities, and all of these mixed with code fences. Every payload that
could run calls `alert(<its number>)` (tests/test_xss.py records any call) or asks for a URL on a host
that does not exist (any such request is recorded too)."""

from __future__ import annotations


def corpus() -> list[str]:
    p: list[str] = []
    a = "alert({})"

    def add(template: str) -> None:
        p.append(template.replace("ALERT", a.format(len(p))))

    # Raw HTML: scripts, handlers, frames, forms, styles, metadata.
    add("<script>ALERT</script>")
    add("<img src=x onerror=ALERT>")
    add('<img src="x" onerror="ALERT">')
    add("<svg onload=ALERT>")
    add("<body onload=ALERT>")
    add('<iframe src="javascript:ALERT"></iframe>')
    add('<iframe srcdoc="<script>parent.ALERT</script>"></iframe>')
    add('<object data="javascript:ALERT"></object>')
    add('<embed src="javascript:ALERT">')
    add('<form action="javascript:ALERT"><button>go</button></form>')
    add('<input autofocus onfocus="ALERT">')
    add('<details open ontoggle="ALERT">x</details>')
    add('<video><source onerror="ALERT"></video>')
    add('<audio src=x onerror="ALERT"></audio>')
    add('<marquee onstart="ALERT">x</marquee>')
    add("<style>@import 'http://xss.invalid/a.css'; body{display:none}</style>")
    add('<link rel="stylesheet" href="http://xss.invalid/b.css">')
    add('<meta http-equiv="refresh" content="0;url=javascript:ALERT">')
    add('<base href="http://xss.invalid/">')
    add('<div style="background:url(http://xss.invalid/c.png)">styled</div>')
    add('"><script>ALERT</script>')
    add("'><img src=x onerror=ALERT>")
    add("</textarea><script>ALERT</script>")
    add("</article></div><script>ALERT</script>")
    add('<noscript><p title="</noscript><img src=x onerror=ALERT>">')
    add('<a href="javascript:ALERT">click me</a>')
    add('<a href="jav&#x09;ascript:ALERT">tab in the scheme</a>')
    add('<form id="lcLeaf"><input name="x"></form><a id="gradio_config"></a>')
    # Markdown: links, images, autolinks, reference links, raw HTML blocks.
    add("[click](javascript:ALERT)")
    add("[click](JaVaScRiPt:ALERT)")
    add("![img](javascript:ALERT)")
    add("![img](http://xss.invalid/d.png)")
    add("<javascript:ALERT>")
    add("<http://xss.invalid/e>")
    add("[ref][r]\n\n[r]: javascript:ALERT")
    add("[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)")
    add("**bold <img src=x onerror=ALERT>** and _em_")
    add("<div>\n\n<script>ALERT</script>\n\n</div>")
    add("| a | b |\n|---|---|\n| <img src=x onerror=ALERT> | [x](javascript:ALERT) |")
    # SVG and MathML.
    add("<svg><script>ALERT</script></svg>")
    add('<svg><animate onbegin="ALERT" attributeName="x" dur="1s"/></svg>')
    add('<svg><a xlink:href="javascript:ALERT"><text x="20" y="20">svg link</text></a></svg>')
    add('<svg><use href="data:image/svg+xml,<svg id=\'x\' xmlns=\'http://www.w3.org/2000/svg\'><image href=\'1\' onerror=\'ALERT\'/></svg>#x"/></svg>')
    add('<math><maction actiontype="statusline" xlink:href="javascript:ALERT">math</maction></math>')
    add("<math><mtext><table><mglyph><style><img src=x onerror=ALERT></style></mglyph></table></mtext></math>")
    add("<svg></p><style><a id=\"</style><img src=1 onerror=ALERT>\">")
    # Entities: encoded markup must stay text, and must not be decoded into markup.
    add("&lt;script&gt;ALERT&lt;/script&gt;")
    add("&#60;img src=x onerror=ALERT&#62;")
    add("&#x3C;svg onload=ALERT&#x3E;")
    add("[entity](&#106;avascript:ALERT)")
    # Mixed with code fences: code shows as text, and markup around or after a fence stays text.
    add("```html\n<script>ALERT</script>\n```")
    add("```\nunclosed fence <img src=x onerror=ALERT>")
    add("```js\n</code></pre><script>ALERT</script>\n```")
    add('```"><img src=x onerror=ALERT>\ncode\n```')
    add("`<img src=x onerror=ALERT>` then <img src=x onerror=ALERT>")
    add("~~~\n~~~\n<iframe src=javascript:ALERT>")
    add("    <script>ALERT</script>  (indented code)")
    # Templates and the page's own hooks.
    add("{{constructor.constructor('ALERT')()}} ${ALERT} <%= ALERT %>")
    add("<div data-act=\"regen\" data-id=\"1\">fake button</div><button onclick=\"ALERT\">b</button>")
    return p


if __name__ == "__main__":
    for i, text in enumerate(corpus()):
        print(i, repr(text))
