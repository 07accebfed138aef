package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/unilet-dev/unilet/api/admin"
)

func imagesCmd(g *globals) *cobra.Command {
	return listCmd(g, &cobra.Command{
		Use:   "images",
		Short: "list the unikernel images on this node: reference, digest, Unikraft version, kernel and initrd size",
	}, func(ctx context.Context, c *client) (*admin.ListImagesResponse, error) {
		return c.ListUnikernelImages(ctx, &admin.ListImagesRequest{})
	}, func(w io.Writer, r *admin.ListImagesResponse) error { return imagesTable(w, r.GetImages()) })
}

func imagesTable(out io.Writer, imgs []*admin.Image) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "REFERENCE\tDIGEST\tUNIKRAFT\tKERNEL\tINITRD\tSIZE\tID")
	for _, i := range imgs {
		refs := i.GetRefs()
		if len(refs) == 0 {
			refs = []string{"<none>"}
		}
		digest := "-"
		if len(i.GetDigests()) > 0 {
			_, d, _ := strings.Cut(i.GetDigests()[0], "@")
			digest = short(d)
		}
		initrd := "-"
		if i.GetInitrdBytes() > 0 {
			initrd = human(i.GetInitrdBytes())
		}
		for _, ref := range refs {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", ref, digest, dash(i.GetUnikraftVersion()), human(i.GetKernelBytes()), initrd,
				human(i.GetSizeBytes()), short(i.GetId()))
		}
	}
	return w.Flush()
}
